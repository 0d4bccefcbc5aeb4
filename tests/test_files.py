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


# --- what an output may be: a new path or a regular file (a symlink written through to one) --------------

@pytest.fixture
def fifo(tmp_path):
    """A FIFO in tmp_path: a node that is not a regular file, like /dev/null (no real device is touched)."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("os.mkfifo is POSIX")
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _still_a_fifo(path):
    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_prepare_output_and_atomic_write_refuse_a_fifo(fifo, tmp_path):
    with pytest.raises(ValueError, match=r"--out must be a new path or a regular file, got the FIFO '.*pipe'"):
        prepare_output(fifo, name="--out")
    with pytest.raises(ValueError, match="path must be a new path or a regular file, got the FIFO"):
        with atomic_write(fifo) as f:
            f.write(b"x")
    assert _still_a_fifo(fifo) and os.listdir(tmp_path) == ["pipe"]


def test_a_symlink_to_a_fifo_is_refused_as_the_fifo(fifo, tmp_path):
    link = tmp_path / "link.pt"
    link.symlink_to(fifo)
    with pytest.raises(ValueError, match=r"got the FIFO '.*link.pt' \(a symlink to '.*pipe'\)"):
        prepare_output(link, name="--out")
    with pytest.raises(ValueError, match="got the FIFO"):
        with atomic_write(link) as f:
            f.write(b"x")
    assert link.is_symlink() and _still_a_fifo(fifo) and sorted(os.listdir(tmp_path)) == ["link.pt", "pipe"]


def test_a_symlink_to_a_file_elsewhere_is_written_through_and_kept(tmp_path):
    """The target is replaced by a temporary file in the target's folder; the link and its folder stay as they were."""
    (tmp_path / "store").mkdir()
    (tmp_path / "runs").mkdir()
    target, link = tmp_path / "store" / "model.pt", tmp_path / "runs" / "model.pt"
    target.write_bytes(OLD)
    link.symlink_to(target)
    assert prepare_output(link) == str(link)
    with atomic_write(link) as f:
        f.write(b"new")
        assert [p for p in os.listdir(tmp_path / "store") if p.endswith(".tmp")]  # the temporary is beside the target
    assert link.is_symlink() and os.readlink(link) == str(target) and target.read_bytes() == b"new"
    assert os.listdir(tmp_path / "store") == ["model.pt"] and os.listdir(tmp_path / "runs") == ["model.pt"]


def test_a_folder_output_refuses_a_fifo(fifo):
    with pytest.raises(NotADirectoryError, match="--out must be a folder, got the existing FIFO"):
        prepare_output(fifo, folder=True, name="--out")


@pytest.mark.parametrize("argv", [["train", "ddpm", "--steps", "1"], ["train", "flow", "--steps", "1"],
                                  ["sample", "--n", "1", "--steps", "1"]])
@pytest.mark.parametrize("through_a_link", [False, True])
def test_the_command_line_refuses_a_fifo_out_in_one_line(fifo, tmp_path, capsys, argv, through_a_link):
    from fastgen import cli

    out = fifo
    if argv[0] == "sample" or through_a_link:  # sample --out needs a .png or .npz name: a link gives it one
        out = tmp_path / "out.npz"
        out.symlink_to(fifo)
    assert cli.main(argv + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--out must be a new path or a regular file, got the FIFO" in err, err
    assert _still_a_fifo(fifo)


SIGTERM_CHILD = """
import sys, time, torch
from fastgen import images

def blocks():
    yield torch.zeros(2, 1, 8, 8)
    print("writing", flush=True)
    time.sleep(120)
    yield torch.zeros(2, 1, 8, 8)

images.save_npz(blocks(), sys.argv[1], shape=(4, 1, 8, 8))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_sigterm_during_a_streamed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    import signal

    path = tmp_path / "samples.npz"
    path.write_bytes(OLD)
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "writing\n", proc.stderr.read()
        assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # mid-write
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert path.read_bytes() == OLD and os.listdir(tmp_path) == ["samples.npz"]
