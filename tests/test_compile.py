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
