"""``python -m fastgen <command>``.

    validate   check every Triton kernel against its torch reference on this device, print a table
"""
import argparse
import os
import sys


def _use_interpreter_without_gpu():
    """Kernels run on CPU tensors only under the Triton interpreter, which must be chosen before
    triton is imported: pick it here when no GPU is present and nothing has imported triton yet."""
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _validate(args) -> int:
    _use_interpreter_without_gpu()
    from fastgen import validate

    return 0 if validate.run(device=args.device, quick=args.quick, ops=args.ops) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("validate", help="check every kernel against its reference, print a table")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--ops", nargs="+", default=None, help="only these op families")
    p.set_defaults(run=_validate)
    args = parser.parse_args(argv)
    return args.run(args)
