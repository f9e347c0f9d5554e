"""Exclusive locks: one process at a time in a run folder (train, export, the search service),
and one builder at a time for a cache entry.

A lock is `fcntl.flock` on a small file. The kernel drops it when its holder exits, however it
exits (`kill -9` included), so a lock is never stale: the file left behind by a dead process
blocks nothing. The holder writes its pid, host and task into the file, so whoever finds the
lock held can say who holds it.

    with hold_workdir_lock(workdir, "export"):
        ...  # nobody else holds `workdir` until the block ends

Multi-host jobs: each process of one job locks its own file (`process_index`), so the hosts of
one job never block each other on a shared filesystem, while a second job (or a second
single-process command) conflicts with the first on process 0's file at the latest.
Filesystems without locks (some network mounts) get a warning and no lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

from facejax.errors import FacejaxError

LOCK_NAME = ".facejax.lock"  # process 0's lock in a run folder; process i > 0: LOCK_NAME + ".<i>"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class Busy(FacejaxError):
    """Another live process holds the lock (its pid is in the message)."""


@dataclasses.dataclass
class HeldLock:
    """A lock this process holds (what `hold_lock` yields)."""

    path: str
    fd: int  # open while held (on a filesystem without locks: open, nothing held)

    def discard(self) -> None:
        """Deletes the lock file while still holding it (a run folder that is being removed)."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def workdir_lock_path(workdir: str, process_index: int = 0) -> str:
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
    return os.path.join(workdir, name)


@contextlib.contextmanager
def hold_workdir_lock(workdir: str, what: str, *, process_index: int = 0) -> Iterator[HeldLock]:
    """Holds the run folder `workdir` exclusively for `what` ('train', 'export', 'serve').

    Raises Busy (one line, naming the holder's pid) when another live process holds it, and
    FacejaxError when `workdir` is not an existing folder. `process_index`: this process's
    index in a multi-host job (each locks its own file; see the module docstring).
    """
    if not os.path.isdir(workdir):
        raise FacejaxError(f"{workdir} is not a run folder (it does not exist)")
    path = workdir_lock_path(workdir, process_index)
    try:
        held = _acquire(path, what)
    except Busy as e:
        raise Busy(f"{workdir} is in use by {e}; wait for it to finish or stop it, or use "
                   "another --workdir") from None
    with _released(held):
        yield held


@contextlib.contextmanager
def hold_lock(path: str, what: str, *, wait: bool = False,
              on_wait: Callable[[str], None] | None = None) -> Iterator[HeldLock]:
    """Holds the lock file `path` (created if missing) exclusively for `what`.

    When another process holds it: raises Busy("<what> (pid N on host)") or, with `wait`,
    calls `on_wait(holder)` once and blocks until the holder is done (or dead).
    """
    held = _acquire(path, what, wait, on_wait)
    with _released(held):
        yield held


@contextlib.contextmanager
def _released(held: HeldLock) -> Iterator[None]:
    try:
        yield
    finally:
        os.close(held.fd)  # releases the lock


def _acquire(path: str, what: str, wait: bool = False, on_wait=None) -> HeldLock:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise FacejaxError(f"cannot create the lock file {path}: {e.strerror or e}") from None
    try:
        if _lock(fd, path, wait, on_wait):
            _write_holder(fd, what)
    except BaseException:
        os.close(fd)
        raise
    return HeldLock(path, fd)


def _lock(fd: int, path: str, wait: bool, on_wait) -> bool:
    """Takes the lock on `fd`: True when held, False when the filesystem has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = _describe_holder(fd)
        if not wait:
            raise Busy(holder) from None
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise FacejaxError(f"cannot lock {path}: {e.strerror or e}") from None
        print(f"warning: cannot lock {path} ({e.strerror}: the filesystem has no locks); make "
              "sure no other process uses it at the same time", file=sys.stderr, flush=True)
        return False
    if on_wait is not None:
        on_wait(holder)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return True


def _write_holder(fd: int, what: str) -> None:
    info = dict(pid=os.getpid(), host=socket.gethostname(), what=what,
                since=time.strftime("%Y-%m-%d %H:%M:%S"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)


def _describe_holder(fd: int) -> str:
    """'train (pid 123 on host, since ...)' from the holder's file, as far as it says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid = int(info["pid"])
    except (OSError, ValueError, TypeError, KeyError):
        # Locked an instant ago, its holder not yet written: nothing more to say.
        return "another process (pid unknown)"
    where = "" if info.get("host") in (None, socket.gethostname()) else f" on {info['host']}"
    since = f", since {info['since']}" if info.get("since") else ""
    return f"{info.get('what') or 'another process'} (pid {pid}{where}{since})"
