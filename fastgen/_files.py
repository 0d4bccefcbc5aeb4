"""Files fastgen writes: whole or not at all, and output paths checked before the work starts.

    from fastgen._files import atomic_write, prepare_output
    out = prepare_output(args.out, name="--out")      # first thing: fails now, not after an hour of work
    ...
    with atomic_write(out, "wb") as f:                  # a temporary file beside ``out``, renamed onto it
        torch.save(state, f)

A write that fails midway (disk full, a file size limit, Ctrl-C, SIGTERM) removes its temporary file
and leaves the file that was at the destination byte for byte as it was.

What an output may be: a new path, or an existing regular file, which is replaced. Anything else that
exists there is refused by name, never renamed over: a directory, a character or block device (such as
/dev/null), a FIFO, a socket. A symlink is written through: the file it points to is replaced (by a
temporary file in that file's folder) and the link stays; a link to anything but a regular file is
refused as that thing would be.
"""
import contextlib
import os
import secrets
import signal
import stat
import threading

MODES = ("w", "wb")
# what stat calls the things an output must not be (a directory has its own error)
NOT_REGULAR = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISFIFO, "FIFO"),
               (stat.S_ISSOCK, "socket"))


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


def _kind(path: str):
    """What is at ``path`` (links followed): None when nothing is or it cannot be looked at (a file in
    the way, a folder that cannot be searched: the folder checks say why), else "file", "directory",
    "character device", "block device", "FIFO", "socket" or "special file"."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    return next((kind for test, kind in NOT_REGULAR if test(mode)), "special file")


def _writable_target(path: str, name: str) -> str:
    """The file a write to ``path`` replaces: ``path``, or the file a symlink there points to. An error
    naming ``name`` when something other than a regular file is there: IsADirectoryError for a
    directory, ValueError for a device, FIFO or socket (renaming onto it would replace the node)."""
    target = os.path.realpath(path)
    kind = _kind(target)
    if kind in (None, "file"):
        return target
    via = f" (a symlink to {target!r})" if os.path.islink(path) else ""
    if kind == "directory":
        raise IsADirectoryError(f"{name} must be a file path, got the directory {path!r}{via}")
    raise ValueError(f"{name} must be a new path or a regular file, got the {kind} {path!r}{via}: fastgen writes a "
                     f"new file and renames it onto the output, which would replace the {kind}")


@contextlib.contextmanager
def _sigterm_raises():
    """While the block runs, SIGTERM raises SystemExit(128 + SIGTERM) (the status the signal would give)
    instead of ending the process at once, so that the block's cleanup runs as for Ctrl-C. Only on the
    main thread and when SIGTERM has its default action (a handler someone installed is left alone);
    the default is restored after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", **open_kwargs):
    """Yield a file object (``open(tmp, mode, **open_kwargs)``) on a temporary file in ``path``'s folder.
    On a clean exit its data is flushed and fsynced and the file renamed onto ``path`` (``os.replace``:
    readers see the old file or the new one, never a part). On any exception, KeyboardInterrupt
    included, and on SIGTERM (then SystemExit), the temporary file is removed and ``path`` is left
    untouched. A symlink at ``path`` is written through: the file it points to is replaced and the link
    kept. A directory, device, FIFO or socket at ``path`` (or at the end of its links) is refused
    before anything is written (``prepare_output`` says which errors)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = _writable_target(os.fspath(path), "path")
    with _sigterm_raises():
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

    A file output (``folder=False``) must be a new path or a regular file (or a symlink to either, then
    written through): a directory there is an IsADirectoryError, a device, FIFO or socket a ValueError.
    A folder output (``folder=True``) must not be anything but a directory (NotADirectoryError). The
    folder that will hold the output is created if missing, and a file is created and removed in it to
    prove it is writable (PermissionError, or NotADirectoryError when a file blocks the way). Errors
    name ``name``."""
    path = _as_str_path(path, name)
    if folder:
        kind = _kind(path)
        if kind not in (None, "directory"):
            raise NotADirectoryError(f"{name} must be a folder, got the existing {kind} {path!r}")
        parent = os.path.realpath(path)
    else:
        parent = os.path.dirname(_writable_target(path, name))
    _make_folder(parent, path, name)
    _check_writable(parent, path, name)
    return path
