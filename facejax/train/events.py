"""TensorBoard scalar event files through tensorboardX (no TensorFlow needed).

`tensorboard --logdir workdir/events` reads them. One file per writer, as before: its name ends
in the process id and a per-process count, because tensorboardX names files by the second and
truncates an existing file of the same name (a run resumed within the same second would lose
the first file's scalars).
"""

from __future__ import annotations

import itertools
import os

_WRITERS = itertools.count()  # this process's writers so far: part of each file's name


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file under `logdir`."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter  # imported here: only the training loop needs it

        os.makedirs(logdir, exist_ok=True)
        # tensorboardX writes from a background thread and flushes every `flush_secs` (default
        # 120): 1 s keeps TensorBoard current during a run; close() writes everything.
        self._writer = SummaryWriter(logdir, flush_secs=1,
                                     filename_suffix=f".{os.getpid()}.{next(_WRITERS)}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Each value under its own tag at `step` (tags as given: 'train/loss_running')."""
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def close(self) -> None:
        self._writer.close()
