"""Child processes that die with their parent, however the parent dies.

grain's data workers and the cache's decode workers are started with multiprocessing's
'spawn'. After a `kill -9` of the parent nothing stops them: they were adopted by init and
kept ~50-200 MB each. Each worker runs `ExitWithParent` at start-up and polls its parent's pid.
"""

from __future__ import annotations

import os
import threading
import time


class ExitWithParent:
    """Made in the parent, called in the worker (grain's `worker_init_fn(index, count)`, or
    with no arguments from a pool initializer): the worker exits when that parent is gone.

    It polls the parent pid rather than using prctl(PR_SET_PDEATHSIG), which fires when the
    *thread* that started the child ends: grain starts its workers from a thread pool.
    """

    POLL_S = 0.25

    def __init__(self):
        self.parent = os.getpid()  # pickled into the worker with this value

    def __call__(self, *worker_index_and_count) -> None:
        if os.getppid() != self.parent:  # died while this worker was starting
            os._exit(1)
        threading.Thread(target=self._watch, name="exit-with-parent", daemon=True).start()

    def _watch(self) -> None:
        while os.getppid() == self.parent:
            time.sleep(self.POLL_S)
        # No cleanup: nobody reads this worker's output any more, and grain's own shutdown
        # would wait on queues whose reader is gone. Its shared memory is unlinked by
        # multiprocessing's resource tracker, which exits once its last user has.
        os._exit(1)
