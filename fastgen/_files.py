"""Files fastgen writes: whole or not at all.

    from fastgen._files import atomic_write
    with atomic_write(out, "wb") as f:                  # a temporary file beside ``out``, renamed onto it
        torch.save(state, f)

A write that fails midway (disk full, a file size limit, Ctrl-C) removes its temporary file and
leaves the file that was at the destination byte for byte as it was.
"""
import contextlib
import os
import secrets
import stat

MODES = ("w", "wb")


def _temporary_path(path: str) -> str:
    """A new hidden file beside ``path`` (same folder, so the rename cannot cross filesystems), created
    with the permissions a plain ``open(path, "w")`` would give it; returns its path."""
    folder, name = os.path.split(path)
    while True:
        candidate = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def _keep_mode(source: str, target: str) -> None:
    """Give ``target`` the permission bits of ``source`` if ``source`` exists (a replaced file keeps its mode)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(target, stat.S_IMODE(os.stat(source).st_mode))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """Yield a file object (``open(tmp, mode, **open_kwargs)``) on a temporary file in ``path``'s folder.
    On a clean exit its data is flushed and fsynced and the file renamed onto ``path`` (``os.replace``:
    readers see the old file or the new one, never a part). On any exception, KeyboardInterrupt
    included, the temporary file is removed and ``path`` is left untouched. A symlink at ``path`` is
    written through (its target is replaced)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = os.path.realpath(os.fspath(path))
    tmp = _temporary_path(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _keep_mode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
