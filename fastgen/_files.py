"""Files fastgen writes: whole or not at all, and output paths checked before the work starts.

    from fastgen._files import atomic_write, prepare_output
    out = prepare_output(args.out, name="--out")      # first thing: fails now, not after an hour of work
    ...
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
    while True:  # the name is cut so that a 255-character file name still has a temporary beside it
        candidate = os.path.join(folder, f".{name[:200]}.{secrets.token_hex(4)}.tmp")
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


def _make_folder(folder: str, path: str, name: str) -> None:
    """Create ``folder`` (and its parents) if missing; an error naming ``name`` if that is impossible."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{name} must be in a folder that exists or can be created, got {path!r}: "
                                 f"a file is in the way of {folder!r}") from None
    except OSError as err:
        raise PermissionError(f"{name} must be in a folder that exists or can be created, got {path!r}: "
                              f"cannot create {folder!r} ({err.strerror})") from None


def _check_writable(folder: str, path: str, name: str) -> None:
    """Create and remove a file in ``folder``, what the atomic writer will do; PermissionError if it cannot."""
    try:
        _remove(_temporary_path(os.path.join(folder, "write-check")))
    except OSError as err:
        raise PermissionError(f"{name} must be in a writable folder, got {path!r}: cannot create a file in "
                              f"{folder!r} ({err.strerror})") from None


def _as_str_path(path, name: str) -> str:
    """``path`` (str or os.PathLike) as a non-empty str; TypeError/ValueError naming ``name`` otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__} {path!r}")
    if not os.fspath(path):
        raise ValueError(f"{name} must be a non-empty path, got ''")
    return os.fspath(path)


def prepare_output(path, *, folder: bool = False, name: str = "out") -> str:
    """Check, before any work, that the output ``path`` can be written; returns it as a str.

    A file output (``folder=False``) must not be an existing directory (IsADirectoryError); a folder
    output (``folder=True``) must not be an existing file (NotADirectoryError). The folder that will
    hold the output is created if missing, and a file is created and removed in it to prove it is
    writable (PermissionError, or NotADirectoryError when a file blocks the way). Errors name ``name``."""
    path = _as_str_path(path, name)
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{name} must be a folder, got the existing file {path!r}")
    if not folder and os.path.isdir(path):
        raise IsADirectoryError(f"{name} must be a file path, got the directory {path!r}")
    parent = os.path.realpath(path if folder else os.path.dirname(os.path.abspath(path)))
    _make_folder(parent, path, name)
    _check_writable(parent, path, name)
    return path
