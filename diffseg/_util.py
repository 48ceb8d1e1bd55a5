"""Small helpers shared across the package."""
import contextlib
import os
import secrets
from pathlib import Path


def env_flag(name):
    """True when the environment variable ``name`` is 1/true/yes/on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def temp_name(path):
    """A fresh temporary name beside ``path``, keeping its suffix (so writers
    that pick the format from it still work): unique per process and call, so
    concurrent writers of the same file never share a temporary file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path, *, durable=False):
    """Yield a temporary path beside ``path``; when the block succeeds it
    replaces ``path`` atomically, else it is removed. Readers never see a
    half-written file. ``durable=True`` also flushes the file to disk before
    the rename and the rename itself (the folder) after it, so that a crash or
    power loss leaves the old file or the whole new one (model bundles)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent, directory=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync(path, *, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """``open(path, mode)`` written through :func:`atomic_path` (mode "w" or "wb")."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode.replace("w", "x")) as f:
        yield f


@contextlib.contextmanager
def file_lock(path):
    """Exclusive advisory lock (``fcntl.flock``) on the file ``path`` (created
    if missing) for the duration of the block; blocks until it is free. The
    file is removed on release. A waiter that wakes up holding the lock of a
    file its holder has since removed locks the current file instead (compares
    inodes), so removing the file never lets two holders in at once."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
            except FileNotFoundError:
                current = False
        except BaseException:
            f.close()
            raise
        if current:
            break
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # still holding the lock (see above)
        f.close()


def progress_bar(**kwargs):
    """A tqdm progress bar: the notebook widget where ipywidgets is installed,
    else the text bar (``tqdm.auto`` would warn in a notebook without it)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(**kwargs)
