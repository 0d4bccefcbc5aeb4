"""Every Triton kernel compiles for a GPU (sm_90), and `validate` exercises every kernel.

The rest of the suite runs kernels in the interpreter when no GPU is present, which accepts code
compiled Triton rejects; this test compiles each kernel variant that `validate --quick` launches,
with the argument types and constexprs of those launches (tests/kernel_compile.py)."""
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args):
    proc = subprocess.run([sys.executable, "-m", "tests.kernel_compile", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_kernel_is_validated_and_compiles_for_sm90(tmp_path):
    launches = tmp_path / "launches.json"
    _run("record", str(launches))
    recorded = json.loads(launches.read_text())
    assert recorded["validate_ok"], "validate --quick failed while recording launches"
    result = json.loads(_run("compile", str(launches)).strip().splitlines()[-1])
    launched = {f"{module}.{name}" for module, name, _, _ in recorded["launches"]}
    never_launched = sorted(set(result["kernels"]) - launched)
    assert not never_launched, f"kernels that `validate` never runs (add them to their family's check): {never_launched}"
    assert result["compiled"] == len(recorded["launches"]) > 0
    assert not result["failures"], "\n\n".join(result["failures"])
