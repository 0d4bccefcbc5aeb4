"""Nothing lost: every file fastgen writes goes through one atomic writer (a temporary file beside the
destination, renamed onto it), so a write that fails midway leaves the old file byte for byte; output
paths are checked before the work starts."""
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from fastgen._files import atomic_write, prepare_output

OLD = b"the good file that was here before\n" * 40

# Each writer: setup code defining write(path), run in a child process whose file size limit is
# smaller than what write(path) produces, so the write fails midway with OSError (EFBIG).
WRITERS = {
    "denoiser checkpoint": """
        from fastgen.models import denoisers
        model = denoisers.MLPDenoiser()
        def write(path):
            denoisers.save_checkpoint(path, model, {"num_train_timesteps": 1000})
    """,
    "gan checkpoint": """
        from fastgen.models import gan
        generator, discriminator = gan.build("dcgan")
        def write(path):
            gan.save_checkpoint(path, generator, discriminator, steps=1)
    """,
    "png grid": """
        import torch
        from fastgen import images
        x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        def write(path):
            images.save_grid(x, path, scale=2)
    """,
    "bench plot": """
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from fastgen.bench import plots
        def write(path):
            plots._panels(plt, path, ["float32"], "a plot", lambda ax, dtype: ax.plot([1, 2], [3, 4], label="x"))
    """,
    "bench results": """
        from fastgen.bench import report
        machine = {"versions": {"torch": "t", "triton": "t"}, "cpu": "cpu", "cpu_count": 1,
                   "date_utc": "today", "git_commit": "abc"}
        result = {"device": "cpu", "quick": True, "machine": machine, "gpu": {"available": False, "reason": "none"},
                  "results": [], "summary": [], "notes": ["x" * 2000], "gpu_before": {}, "gpu_after": {}}
        def write(path):
            report.write_outputs(result, os.path.dirname(path), plots=False)
    """,
}

CHILD = """
import os, resource, signal, sys
{setup}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write then fails with EFBIG, not a signal
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write(sys.argv[1])
except Exception as err:
    print("write failed:", type(err).__name__, err)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(writer, tmp_path):
    name = {"bench results": "results.json", "bench plot": "plot.png", "png grid": "grid.png"}.get(writer, "model.pt")
    path = tmp_path / name
    path.write_bytes(OLD)
    script = CHILD.format(setup=textwrap.dedent(WRITERS[writer]))
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr  # the write did fail
    assert path.read_bytes() == OLD
    assert sorted(os.listdir(tmp_path)) == [name]


def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write("new")
        assert path.read_text() == "old"  # nothing is visible before the rename
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_atomic_write_interrupted_leaves_the_old_file(tmp_path, error):
    path = tmp_path / "a.bin"
    path.write_bytes(OLD)
    with pytest.raises(error):
        with atomic_write(path) as f:
            f.write(b"half a file")
            raise error()
    assert path.read_bytes() == OLD and os.listdir(tmp_path) == ["a.bin"]


def test_atomic_write_keeps_the_mode_and_writes_through_a_symlink(tmp_path):
    target, link = tmp_path / "target.bin", tmp_path / "link.bin"
    target.write_bytes(OLD)
    os.chmod(target, 0o640)
    link.symlink_to(target)
    with atomic_write(link) as f:
        f.write(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_atomic_write_gives_a_new_file_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.bin").st_mode) == 0o644


def test_atomic_write_takes_the_longest_file_name(tmp_path):
    path = tmp_path / ("x" * 251 + ".png")
    with atomic_write(path) as f:
        f.write(b"x")
    assert path.read_bytes() == b"x" and os.listdir(tmp_path) == [path.name]


def test_atomic_write_names_a_bad_mode(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        with atomic_write(tmp_path / "a", "a"):
            pass


# --- output paths, checked before the work --------------------------------------------------------

def test_prepare_output_creates_missing_folders_and_leaves_nothing(tmp_path):
    path = tmp_path / "a" / "b" / "model.pt"
    assert prepare_output(path) == str(path)
    assert os.listdir(tmp_path / "a" / "b") == []
    assert prepare_output(tmp_path / "runs" / "r1", folder=True) == str(tmp_path / "runs" / "r1")
    assert os.listdir(tmp_path / "runs" / "r1") == []


def test_prepare_output_refuses_a_directory_for_a_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="--out must be a file path, got the directory"):
        prepare_output(tmp_path, name="--out")


def test_prepare_output_refuses_a_file_for_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="out must be a folder, got the existing file"):
        prepare_output(tmp_path / "f", folder=True)


def test_prepare_output_refuses_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="a file is in the way"):
        prepare_output(tmp_path / "f" / "sub" / "model.pt")


def test_prepare_output_refuses_an_unwritable_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    os.chmod(folder, 0o555)
    try:
        try:  # root writes into read-only folders: then there is nothing to refuse
            (folder / "probe").write_text("x")
            (folder / "probe").unlink()
            pytest.skip("this user can write into a read-only folder (root)")
        except PermissionError:
            pass
        with pytest.raises(PermissionError, match="out must be in a writable folder"):
            prepare_output(folder / "model.pt")
    finally:
        os.chmod(folder, 0o755)


@pytest.mark.parametrize("path, error", [(3, TypeError), (b"x.pt", TypeError), ("", ValueError)])
def test_prepare_output_names_a_bad_path(path, error):
    with pytest.raises(error, match="out must be"):
        prepare_output(path)
