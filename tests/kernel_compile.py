"""Compile every launched Triton kernel for a real GPU target, on a machine without one.

The interpreter runs kernels as Python and accepts code that compiled Triton rejects (plain float
globals, bf16 arithmetic, ...), so a CPU-only test run alone cannot tell that a kernel compiles.
Two steps, each in its own process because TRITON_INTERPRET is read when triton is imported:

    python -m tests.kernel_compile record OUT.json    # interpreter: run `validate --quick`, record
                                                      # each launch's argument types and constexprs
    python -m tests.kernel_compile compile IN.json    # compiled mode: build each recorded variant
                                                      # for sm_90 (ttir -> ptx -> cubin); list every
                                                      # *_kernel in fastgen.kernels
"""
import inspect
import json
import os
import sys

TARGET = ("cuda", 90, 32)  # H100/H200


def _signature(fn, args, kwargs):
    """({param: triton type}, {param: constexpr value}) of one launch of ``fn`` (a plain function)."""
    from triton.runtime.jit import _normalize_ty, mangle_type

    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    types, constexprs = {}, {}
    for name, value in bound.arguments.items():
        annotation = inspect.signature(fn).parameters[name].annotation
        annotation = "" if annotation is inspect.Parameter.empty else _normalize_ty(annotation)
        if "constexpr" in annotation:
            constexprs[name] = value if isinstance(value, (int, float, bool, str)) or value is None else str(value)
        elif value is None:
            types[name], constexprs[name] = "constexpr", None
        elif annotation:  # a typed scalar (tl.int64, tl.float32): the type is fixed, never specialised
            types[name] = annotation
        else:
            types[name] = mangle_type(value)
    return types, constexprs


def record(path):
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        types, constexprs = _signature(self.fn, args, kwargs)
        key = json.dumps([self.fn.__module__, self.fn.__name__, types, constexprs], sort_keys=True, default=str)
        launches[key] = [self.fn.__module__, self.fn.__name__, types, constexprs]
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    import fastgen.kernels
    from fastgen import validate

    fastgen.kernels.INTERPRETER_BLOCK = 1  # launch with the GPU's block sizes: those are what get compiled

    lines = []
    ok = validate.run(device="cpu", quick=True, out=lines.append)
    with open(path, "w") as f:
        json.dump({"validate_ok": ok, "launches": list(launches.values())}, f)


def compile_all(path):
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import pkgutil

    import fastgen.kernels
    from triton.runtime.jit import JITFunction

    with open(path) as f:
        launches = json.load(f)["launches"]
    kernels = sorted(f"{m.name}.{name}" for m in pkgutil.iter_modules(fastgen.kernels.__path__, "fastgen.kernels.")
                     for name, obj in vars(importlib.import_module(m.name)).items()
                     if isinstance(obj, JITFunction) and name.endswith("_kernel"))
    failures = []
    for module, name, types, constexprs in launches:
        kernel = getattr(importlib.import_module(module), name)
        src = ASTSource(fn=kernel, signature={**types, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
        try:
            triton.compile(src, target=GPUTarget(*TARGET))
        except Exception as err:  # report every failing kernel, not just the first
            failures.append(f"{module}.{name} {types} {constexprs}: {type(err).__name__}: {str(err)[-1500:]}")
    print(json.dumps({"kernels": kernels, "compiled": len(launches) - len(failures), "failures": failures}))


if __name__ == "__main__":
    {"record": record, "compile": compile_all}[sys.argv[1]](sys.argv[2])
