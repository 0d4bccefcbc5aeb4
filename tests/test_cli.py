"""The README's main job: ``python -m fastgen validate`` prints a table and fails on a failure."""
import subprocess
import sys

from fastgen import validate


def test_validate_command_prints_a_passing_table():
    proc = subprocess.run([sys.executable, "-m", "fastgen", "validate", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| randn" in proc.stdout and "| philox4x32" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_validate_reports_a_failing_kernel(monkeypatch, device):
    """A kernel that writes wrong numbers must turn the table red and the exit status non-zero."""
    from fastgen.kernels import random as k_random

    real = k_random.randn
    monkeypatch.setattr(k_random, "randn", lambda out, *a, **k: real(out, *a, **k).mul_(1.001))
    lines = []
    assert validate.run(device=device, quick=True, ops=["randn"], out=lines.append) is False
    assert "FAIL" in "\n".join(lines)
