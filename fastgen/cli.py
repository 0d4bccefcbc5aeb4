"""``python -m fastgen <command>``.

    validate   check every Triton kernel against its torch reference on this device, print a table
    bench      time every op against its peers and the copy bandwidth: table, results.json, plots
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


def _bench(args) -> int:
    _use_interpreter_without_gpu()
    from fastgen.bench import report

    try:
        result = report.run(ops=args.ops, sizes=args.sizes, dtypes=args.dtypes, providers=args.providers,
                            device=args.device, out=args.out, quick=args.quick, progress=not args.no_progress,
                            plots=not args.no_plots)
    except ValueError as e:
        print(f"python -m fastgen bench: error: {e}", file=sys.stderr)
        return 2
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("validate", help="check every kernel against its reference, print a table")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--ops", nargs="+", default=None, help="only these op families")
    p.set_defaults(run=_validate)
    p = commands.add_parser("bench", help="benchmark ops against peers and the copy bandwidth; table, JSON, plots")
    p.add_argument("--ops", nargs="+", default=None, help="only these ops or op families")
    p.add_argument("--sizes", nargs="+", default=None, help="element counts (4096 2**20 16M); default: each op's sweep")
    p.add_argument("--dtypes", nargs="+", default=None, help="float32 float16 bfloat16 (or fp32 fp16 bf16)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="only these providers, by name or role (fastgen reference compiled peer)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--out", default="bench-results", help="output folder (default: ./bench-results)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes, no torch.compile; on CPU the Triton kernels are interpreted")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_bench)
    args = parser.parse_args(argv)
    return args.run(args)
