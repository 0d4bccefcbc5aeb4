"""The README's main job: ``python -m fastgen validate`` prints a table and fails on a failure."""
import os
import subprocess
import sys

import pytest
import torch

from fastgen import registry, validate


def test_validate_command_prints_a_passing_table():
    proc = subprocess.run([sys.executable, "-m", "fastgen", "validate", "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| randn" in proc.stdout and "| philox4x32" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_validate_runs_in_a_shell_without_triton_interpret():
    """The suite sets TRITON_INTERPRET; a user's shell does not. On a CPU build of torch ``import fastgen``
    chooses the interpreter (it imports triton, so the command cannot choose later); a CUDA build
    without a GPU gets one line saying what to set, exit 2."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastgen", "validate", "--ops", "randn", "--quick"],
                          capture_output=True, text=True, timeout=600, env=env)
    if torch.version.cuda is None or torch.cuda.is_available():
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 2 and "TRITON_INTERPRET=1" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_reports_a_failing_kernel(monkeypatch, device):
    """A kernel that writes wrong numbers must turn the table red and the exit status non-zero."""
    from fastgen.kernels import random as k_random

    real = k_random.randn
    monkeypatch.setattr(k_random, "randn", lambda out, *a, **k: real(out, *a, **k).mul_(1.001))
    lines = []
    assert validate.run(device=device, quick=True, ops=["randn"], out=lines.append) is False
    assert "FAIL" in "\n".join(lines)


# --- user errors: one line on stderr, exit status 2, before any work --------------------------------

def _user_error(capsys, argv):
    """Run ``python -m fastgen <argv>`` in this process; the stderr lines of a user error (exit 2)."""
    from fastgen import cli

    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith(f"python -m fastgen {argv[0]}: error: "), lines[0]
    return lines[0]


class _RunsCode:
    """Pickles as a call of print: a file holding it would run code when loaded without weights_only."""

    def __reduce__(self):
        return print, ("this checkpoint ran code",)


def _bad_checkpoints(folder):
    """{kind: path} of files ``--checkpoint`` must refuse, and the message fragment each gets."""
    import torch

    from fastgen.models import gan

    (folder / "text.pt").write_text("not a checkpoint at all\n" * 10)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "no_format.pt")
    torch.save({"format": "fastgen-denoiser/1", "code": _RunsCode()}, folder / "code.pt")
    gan.save_checkpoint(folder / "gan.pt", *gan.build("mlp", hidden=8))
    (folder / "a_folder.pt").mkdir()
    return {"text.pt": "not a fastgen checkpoint", "no_format.pt": "not a fastgen checkpoint",
            "code.pt": "refused: contains pickled code, loading only plain tensors (weights_only=True)",
            "gan.pt": "its format is 'fastgen-gan/1'", "a_folder.pt": "got the directory",
            "missing.pt": "does not exist"}


def test_sample_refuses_a_checkpoint_and_says_why(tmp_path, capsys):
    for name, reason in _bad_checkpoints(tmp_path).items():
        line = _user_error(capsys, ["sample", "--checkpoint", str(tmp_path / name), "--n", "1", "--steps", "1",
                                    "--out", str(tmp_path / "grid.png"), "--no-progress"])
        assert reason in line and name in line, line
    assert not (tmp_path / "grid.png").exists()
    assert "ran code" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "ddpm", "--steps", "-1"], "argument --steps: must be an integer >= 0, got -1"),
    (["train", "gan", "--threads", "-2"], "argument --threads: must be an integer >= 1, got -2"),
    (["train", "gan", "--threads", "two"], "argument --threads: must be an integer >= 1, got 'two'"),
    (["train", "gan", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["sample", "--n", "-3"], "argument --n: must be an integer >= 1, got -3"),
    (["sample", "--steps", "-1"], "argument --steps: must be an integer >= 1"),
    (["sample", "--scale", "0"], "argument --scale: must be an integer >= 1, got 0"),
    (["sample", "--eta", "1.5"], "argument --eta: must be a number in [0, 1], got 1.5"),
    (["sample", "--eta", "-0.1"], "argument --eta: must be a number in [0, 1]"),
    (["sample", "--eta", "nan"], "argument --eta: must be a number in [0, 1]"),
    (["sample", "--device", "tpu"], "argument --device: must be cpu, cuda or cuda:N, got 'tpu'"),
    (["sample", "--repeats", "0"], "argument --repeats: must be an integer >= 1, got 0"),
    (["sample", "--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["validate", "--device", "cuda:x"], "argument --device: must be cpu, cuda or cuda:N"),
    (["bench", "--device", "meta"], "argument --device: must be cpu, cuda or cuda:N"),
    (["train", "ddpm", "--denoiser", "vit"], "argument --denoiser: invalid choice: 'vit'"),
    (["validate", "--ops", "no_such_op"], "ops must name registered checks"),
    (["sample", "--sampler", "ipndm"], "argument --sampler: invalid choice: 'ipndm'"),
    (["sample", "--guidance-scale", "inf"], "argument --guidance-scale: must be a finite number, got inf"),
    (["sample", "--guidance-scale", "3", "--n", "1"], "--guidance-scale needs --label"),
    (["sample", "--label", "10", "--n", "1"], "--label must be in [0, 10) (the model's classes), got 10"),
])
def test_bad_arguments_get_one_line_and_status_2(argv, message, capsys):
    assert message in _user_error(capsys, argv)


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="checks the error for --device cuda on a machine without CUDA; this one has CUDA")
@pytest.mark.parametrize("command", [["train", "ddpm"], ["sample"], ["validate"], ["bench"]])
def test_cuda_without_cuda_is_a_user_error(command, capsys):
    assert "needs CUDA, which this machine lacks" in _user_error(capsys, command + ["--device", "cuda"])


def test_output_paths_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    """A training or sampling run never starts when its output cannot be written."""
    from fastgen.models import denoisers, gan

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(denoisers, "train", no_work)
    monkeypatch.setattr(gan, "train", no_work)
    monkeypatch.setattr(denoisers, "pretrained_denoiser", no_work)
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    cases = [
        (["train", "ddpm", "--out", str(tmp_path)], "--out must be a file path, got the directory"),
        (["train", "gan", "--out", str(tmp_path / "file" / "sub" / "g.pt")], "a file is in the way"),
        (["sample", "--out", str(tmp_path / "folder.png")], "--out must be a file path, got the directory"),
        (["bench", "--quick", "--out", str(tmp_path / "file")], "--out must be a folder, got the existing file"),
        (["bench", "--static", "--out", str(tmp_path / "file")], "--out must be a folder, got the existing file"),
    ]
    for argv, message in cases:
        assert message in _user_error(capsys, argv)


def test_train_creates_a_missing_output_folder(tmp_path, capsys):
    from fastgen import cli
    from fastgen.models import gan

    out = tmp_path / "new" / "folder" / "g.pt"
    assert cli.main(["train", "gan", "--architecture", "mlp", "--steps", "1", "--batch-size", "8",
                     "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert gan.load_checkpoint(out).latent_dim == 32


def test_ctrl_c_during_training_keeps_the_old_checkpoint(tmp_path, capsys, monkeypatch):
    from fastgen import cli
    from fastgen.models import denoisers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "ddpm.pt"
    out.write_bytes(b"the checkpoint of yesterday's run")
    monkeypatch.setattr(denoisers, "train", interrupted)
    assert cli.main(["train", "ddpm", "--steps", "5", "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.splitlines() == ["python -m fastgen train: interrupted; no output was left half written"]
    assert out.read_bytes() == b"the checkpoint of yesterday's run" and os.listdir(tmp_path) == ["ddpm.pt"]


def test_the_command_line_prints_one_line_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastgen", "train", "ddpm", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"python -m fastgen train: error: --out must be a file path, "
                                        f"got the directory {str(tmp_path)!r}"]


@pytest.mark.parametrize("sampler", [name for name in registry.DIGITS_SAMPLERS if name not in ("ddpm", "ddim")])
def test_sample_runs_every_sampler_into_npz(tmp_path, capsys, sampler):
    import numpy as np

    from fastgen import cli

    out = tmp_path / "x.npz"
    # KDPM2 ancestral's first step from the digits schedule's sigma_max (~2e4) in 3 steps has sigma_down 0
    # in float32 (diffusers' own step gives NaN there; fastgen refuses the run): 10 steps
    steps = "10" if sampler == "kdpm2_ancestral" else "3"
    assert cli.main(["sample", "--sampler", sampler, "--steps", steps, "--n", "3", "--out", str(out), "--no-progress"]) == 0
    samples = np.load(out)["samples"]
    assert samples.shape == (3, 1, 8, 8) and samples.dtype == np.float32
    assert ((samples >= 0) & (samples <= 1)).all()
    assert "fastgen vs reference" in capsys.readouterr().out


def test_sample_consistency_two_steps_runs_the_searched_timesteps(tmp_path, capsys):
    """--sampler consistency --steps 2 samples the shipped student with the 2-step timesteps its
    checkpoint records (fastgen.sample(timesteps=...)), and says so."""
    import numpy as np

    import fastgen
    from fastgen import cli
    from fastgen.models import consistency

    model, scheduler = consistency.consistency_sampler()
    timesteps = model.metadata["two_step_timesteps"]
    out = tmp_path / "x.npz"
    assert cli.main(["sample", "--sampler", "consistency", "--steps", "2", "--n", "4", "--seed", "3", "--out",
                     str(out), "--no-progress", "--no-reference"]) == 0
    assert f"2 CONSISTENCY steps (timesteps {timesteps})" in capsys.readouterr().out
    want = fastgen.sample(model, (4, 1, 8, 8), scheduler, timesteps=timesteps, seed=3)
    assert np.allclose(np.load(out)["samples"], (want.numpy() + 1) / 2, atol=1e-6)


def test_sample_a_chosen_digit_with_guidance(tmp_path, capsys):
    """--label K --guidance-scale W: the shipped teacher's guided samples are recognised as K."""
    import numpy as np
    import torch

    from fastgen import cli, quality

    out = tmp_path / "sevens.npz"
    assert cli.main(["sample", "--label", "7", "--guidance-scale", "2", "--steps", "20", "--n", "16", "--out", str(out),
                     "--no-progress", "--no-reference"]) == 0
    probabilities = quality.class_probabilities(torch.from_numpy(np.load(out)["samples"]))
    assert (probabilities.argmax(1) == 7).float().mean() >= 0.9


def test_label_needs_a_conditional_checkpoint(tmp_path, capsys):
    from fastgen.models import denoisers

    path = tmp_path / "unconditional.pt"
    denoisers.save_checkpoint(path, denoisers.MLPDenoiser(dim=64, hidden=16, depth=1), dict(num_train_timesteps=10))
    line = _user_error(capsys, ["sample", "--checkpoint", str(path), "--label", "3", "--n", "2", "--steps", "2",
                                "--out", str(tmp_path / "x.png")])
    assert "--label needs a class-conditional denoiser" in line
    assert not (tmp_path / "x.png").exists()


def test_train_and_sample_the_flow(tmp_path, capsys):
    """train flow writes a checkpoint that --resume continues (a finished run stays finished) and that
    sample --model flow --checkpoint reads; the grid is a PNG."""
    from fastgen.cli import main

    out = tmp_path / "runs" / "flow.pt"
    assert main(["train", "flow", "--steps", "2", "--checkpoint-every", "1", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["train", "flow", "--resume", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    assert "bits/dim" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert main(["sample", "--model", "flow", "--n", "4", "--checkpoint", str(out), "--out", str(grid)]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(first) > 0


def test_train_ddpm_conditional_resume_and_sample(tmp_path, capsys):
    """train ddpm --conditional writes a checkpoint every --checkpoint-every steps that --resume continues
    (a finished run stays finished) and that sample --checkpoint reads; --slim leaves weights only."""
    import torch

    from fastgen.cli import main
    from fastgen.models import denoisers

    out = tmp_path / "runs" / "ddpm.pt"
    small = ["--denoiser", "mlp", "--width", "16", "--depth", "1", "--threads", "1", "--no-progress"]
    assert main(["train", "ddpm", "--steps", "2", "--checkpoint-every", "1", "--conditional", "--label-dropout", "0.2",
                 "--beta-schedule", "squaredcos_cap_v2", "--prediction-type", "v_prediction", "--out", str(out)]
                + small) == 0
    model = denoisers.load_checkpoint(out)
    assert model.num_classes == 10 and model.metadata["label_dropout"] == 0.2
    assert model.scheduler_config["beta_schedule"] == "squaredcos_cap_v2" and model.prediction_type == "v_prediction"
    assert main(["train", "ddpm", "--resume", "--out", str(out)] + small) == 0
    assert "conditional" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["training"]["step"] == 2
    grid = tmp_path / "grid.png"
    assert main(["sample", "--n", "4", "--steps", "2", "--checkpoint", str(out), "--out", str(grid),
                 "--no-reference", "--no-progress"]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["train", "ddpm", "--steps", "1", "--slim", "--out", str(out)] + small) == 0
    assert "training" not in torch.load(out, weights_only=True)
    assert main(["train", "ddpm", "--resume", "--out", str(out)] + small) == 2
    assert "holds no training state" in capsys.readouterr().err


def test_flow_arguments_are_one_line_errors(tmp_path, capsys):
    from fastgen.cli import main

    assert main(["sample", "--model", "flow", "--temperature", "0"]) == 2
    assert main(["train", "flow", "--resume", "--out", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("python -m fastgen ") and "error:" in line for line in err)


def test_sample_times_repeated_calls_after_a_warm_up(tmp_path, capsys, monkeypatch):
    """The table gives the median and the min-max of --repeats timed calls, after an untimed warm-up."""
    from fastgen import cli, sampling

    calls = []
    real_call = sampling.Sampler.__call__
    monkeypatch.setattr(sampling.Sampler, "__call__", lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k))
    assert cli.main(["sample", "--n", "2", "--steps", "2", "--repeats", "2", "--threads", "1", "--no-progress",
                     "--no-reference", "--out", str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 3  # one warm-up, two timed
    assert "(1 CPU threads)" in out and "after a warm-up call, 2 timed calls each: median (min - max)" in out
    row = next(line for line in out.splitlines() if line.startswith("fastgen"))
    assert row.count("(") == 3 and " - " in row  # the label's parenthesis, then per step and total spreads


@pytest.mark.parametrize("option, value, model", [
    ("--sampler", "ddpm", "flow"), ("--label", "3", "flow"), ("--guidance-scale", "2", "flow"),
    ("--steps", "5", "flow"), ("--eta", "0.5", "flow"), ("--temperature", "0.8", "ddpm"),
])
def test_a_sample_option_of_the_other_model_is_refused(tmp_path, capsys, monkeypatch, option, value, model):
    """An option that does not apply to --model is named in one line (exit 2) before any work, never ignored."""
    from fastgen.models import denoisers, flows

    def no_work(*args, **kwargs):
        raise AssertionError("the work started")

    monkeypatch.setattr(denoisers, "pretrained_denoiser", no_work)
    monkeypatch.setattr(flows, "pretrained_flow", no_work)
    line = _user_error(capsys, ["sample", "--model", model, option, value, "--n", "2",
                                "--out", str(tmp_path / "x.png")])
    other = {"flow": "ddpm", "ddpm": "flow"}[model]
    assert line.endswith(f"{option} does not apply to --model {model} (it is an option of --model {other})"), line
    assert not (tmp_path / "x.png").exists()


def test_the_defaults_of_the_other_model_are_not_refused(tmp_path, capsys, monkeypatch):
    """Left out, the options of one model never trouble the other: the flow runs with its temperature 1."""
    from fastgen.models import flows

    calls = []
    monkeypatch.setattr(flows, "sample_flow", lambda out, **kw: calls.append(kw) or dict(seconds=0.0, quality=None))
    from fastgen import cli

    assert cli.main(["sample", "--model", "flow", "--n", "2", "--out", str(tmp_path / "x.png")]) == 0
    assert calls[0]["temperature"] == 1.0


def test_sample_flow_without_scikit_learn_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import sys

    from fastgen.models import flows

    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setattr(flows, "pretrained_flow", lambda **kw: pytest.fail("the work started"))
    line = _user_error(capsys, ["sample", "--model", "flow", "--n", "2", "--out", str(tmp_path / "x.png")])
    assert "pip install scikit-learn (or pip install 'fastgen[train]')" in line
    assert not (tmp_path / "x.png").exists()
