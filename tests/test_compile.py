"""Every Triton kernel compiles for a GPU (sm_90), and `validate` exercises every kernel.

The rest of the suite runs kernels in the interpreter when no GPU is present, which accepts code
compiled Triton rejects; this test compiles each kernel variant that `validate --quick` launches, with
the argument types, constexprs and specialisation of those launches (fastgen.bench.static, through
the session fixture ``static_report``)."""


def test_every_kernel_is_validated_and_compiles_for_sm90(static_report):
    recorded, report = static_report
    assert recorded["validate_ok"], "validate --quick failed while recording launches"
    launched = {f"{launch['module']}.{launch['name']}" for launch in recorded["launches"]}
    never_launched = sorted(set(report["kernels"]) - launched)
    assert not never_launched, f"kernels that `validate` never runs (add them to their family's check): {never_launched}"
    assert not report["failures"], "\n\n".join(report["failures"])
    assert len(report["variants"]) == len(recorded["launches"]) > 0


# The keywords a compiled launch reads as its own options. The interpreter ignores them, so a launched
# kernel's parameter with one of these names runs here and is refused on a GPU when passed by keyword
# (Triton 3.6 asserts on `stream`). Device functions (called from kernels, never launched) may use them.
LAUNCH_OPTIONS = {"grid", "warmup", "stream", "device", "device_type", "num_warps", "num_stages", "num_ctas",
                  "maxnreg", "debug", "enable_fp_fusion", "launch_cooperative_grid"}


def test_no_kernel_parameter_is_named_like_a_launch_option():
    import importlib
    import pkgutil

    import triton

    from fastgen import kernels

    clashes = []
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fastgen.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.jit.KernelInterface) and name.endswith("_kernel"):  # launched
                clashes += [f"{info.name}.{name}({arg})" for arg in value.arg_names if arg in LAUNCH_OPTIONS]
    assert not clashes, f"kernel parameters named like a launch option: {clashes}"
