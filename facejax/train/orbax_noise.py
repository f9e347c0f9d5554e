"""Silences orbax output that is expected, only around the orbax calls that print it: notes
about what facejax does on purpose (manager creation, saves), and the leftovers of a restore
that failed (reported once, as a CheckpointError, instead). Nothing is installed at import or
left installed after a successful call; only a failed restore leaves its narrow filters."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator


class _QuietExpected(logging.Filter):
    """Drops orbax notes about things facejax does on purpose (mid-epoch checkpoints carry no
    metric; export opens the folder read-only)."""

    EXPECTED = ("did not provide metrics", "Given directory is read only",
                "setting save_interval_steps=0")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(e in record.getMessage() for e in self.EXPECTED)


class _QuietAbandonedReads(logging.Filter):
    """Drops asyncio's "Task (or Future) exception was never retrieved" for orbax's array
    reads: when one read of a damaged checkpoint fails, orbax abandons its sibling reads, whose
    failures are the same damage. Some of those tasks name an orbax coroutine; others are a
    bare `_wrap_awaitable` or a plain Future whose error is tensorstore's (it quotes its
    `tensorstore_spec`, whose JSON has keys such as `recheck_cached_data`)."""

    NEVER_RETRIEVED = ("Task exception was never retrieved",
                       "Future exception was never retrieved")
    CHECKPOINT_READ = ("orbax", "tensorstore", "recheck_cached_data")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (any(m in msg for m in self.NEVER_RETRIEVED)
                    and any(m in msg for m in self.CHECKPOINT_READ))


def _drop_abandoned_reads(previous):
    """An unraisablehook that drops what orbax's abandoned reads leave behind (tensorstore
    callbacks into the event loop orbax already closed, read coroutines collected with their
    error); everything else goes to `previous`."""

    def hook(unraisable):
        exc, obj = unraisable.exc_value, unraisable.object
        closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
        code = getattr(obj, "cr_code", None)
        orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        if not (closed_loop or orbax_read):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    return hook


@contextlib.contextmanager
def quiet_expected_notes() -> Iterator[None]:
    """Around orbax calls that log notes about what facejax does on purpose: creating a
    manager (read-only for export) and saving (mid-epoch checkpoints carry no metric)."""
    absl_log = logging.getLogger("absl")
    log_filter = _QuietExpected()
    absl_log.addFilter(log_filter)
    try:
        yield
    finally:
        absl_log.removeFilter(log_filter)


@contextlib.contextmanager
def quiet_failed_restore() -> Iterator[None]:
    """Around an orbax restore: a failed restore abandons its sibling reads, whose failures
    (the same damage) print while the restore is failing, when their tasks are collected, and
    when tensorstore finishes them later, into an event loop orbax has closed. After a
    successful restore both hooks come off. After a failed one they stay for the rest of the
    process, because those reads end at a time nothing can wait for (under load, seconds after
    the CheckpointError); they drop only reports of orbax/tensorstore reads, and a script ends
    on that CheckpointError anyway."""
    previous_hook = sys.unraisablehook
    asyncio_log = logging.getLogger("asyncio")
    if getattr(previous_hook, "drops_abandoned_reads", False):  # left by a failed restore
        hook, log_filter = previous_hook, None
    else:
        hook = _drop_abandoned_reads(previous_hook)
        sys.unraisablehook = hook
        log_filter = _QuietAbandonedReads()
        asyncio_log.addFilter(log_filter)
    try:
        yield
    except BaseException:
        gc.collect()  # abandoned read tasks report "exception was never retrieved" now
        raise
    else:
        if log_filter is not None:
            asyncio_log.removeFilter(log_filter)
            if sys.unraisablehook is hook:  # someone else's hook installed meanwhile stays
                sys.unraisablehook = previous_hook
