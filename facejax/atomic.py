"""Write a file or a directory so readers see the old version or the new one, never a
half-written one: `write_file_atomic` (bytes), `atomic_path` (any writer that takes a path),
`atomic_dir` (a folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_dir(final: str) -> Iterator[str]:
    """Yields a fresh temporary directory beside `final`; on success it replaces `final`.

    The temporary directory lives in the same parent so the renames stay on one filesystem.
    An existing `final` is first renamed aside and deleted only after the new one is in
    place, so a crash leaves either the old or the new directory (plus a `.old-*` folder
    to clean up), never a mix. On an exception the temporary directory is removed and
    `final` is untouched.
    """
    final = os.path.abspath(final)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    recover_dir(final)
    base = os.path.basename(final)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
        yield tmp
        _fsync_tree(tmp)
        old = None
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rmdir(old)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_dir(final: str) -> bool:
    """Puts back the previous `final` if a crash fell between `atomic_dir`'s two renames (the
    old copy moved aside, the new one not yet in place); True if it did. Readers call it
    before they open `final`, so such a crash leaves the old version, never none."""
    final = os.path.abspath(final)
    if os.path.lexists(final):
        return False
    parent, base = os.path.dirname(final), os.path.basename(final)
    try:
        olds = [e for e in os.scandir(parent)
                if e.name.startswith(f".{base}.old-") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return False
    if not olds:
        return False
    newest = max(olds, key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns)
    os.rename(newest.path, final)
    fsync_dir(parent)
    return True


def write_file_atomic(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file and `os.replace`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary file name beside `path` for a writer to fill (`suffix`: the extension
    for writers that choose the format by it, e.g. ".png", ".npy"); when the block succeeds the
    file is synced and replaces `path`. On an exception it is removed and `path` is untouched.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=parent)
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str) -> None:
    # Directory fsync makes the rename durable; not every platform allows it.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
