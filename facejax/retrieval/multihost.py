"""The gallery embedded by every process of a jax.distributed job (scripts/build_index.py
started by a scheduler, like training: see facejax.cluster and deploy/).

Shard s of `embed_to_shards` belongs to process s % process_count. Process 0 first settles the
work folder (a stale job's shards are wiped), every process then embeds its own missing shards
into the shared `WORKDIR/index_work/`, and process 0 loads them all and builds the index. The
shards are the same files a 1-process build writes, so a job killed mid-way resumes with any
process count: finished shards are never embedded again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from facejax.retrieval.embed import Embedder, embed_to_shards

# Fault injection for tests: a process exits (status 3, no cleanup) after embedding this many
# shards, as if killed mid-way.
FAULT_EXIT_AFTER_SHARDS = "FACEJAX_FAULT_EXIT_AFTER_SHARDS"


def process_count() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Every process of the job reaches `name` before any goes on (no-op for one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"facejax:{name}")


def _own_shards(process: int, count: int) -> Callable[[int], bool]:
    limit = int(os.environ.get(FAULT_EXIT_AFTER_SHARDS) or 0)
    taken = [0]

    def mine(shard: int) -> bool:
        if shard % count != process:
            return False
        if limit and taken[0] >= limit:  # the previous `limit` shards are on disk
            os._exit(3)
        taken[0] += 1
        return True

    return mine


def embed_gallery(embedder: Embedder, images, indices: np.ndarray, paths: Sequence[str],
                  work_dir: str, *, shard_size: int, batch_size: int, progress: bool
                  ) -> np.ndarray | None:
    """All gallery embeddings on process 0; None on the others (their shards are on disk)."""
    import jax

    kw = dict(shard_size=shard_size, batch_size=batch_size, progress=progress)
    count, process = jax.process_count(), jax.process_index()
    if count == 1 and not os.environ.get(FAULT_EXIT_AFTER_SHARDS):
        return embed_to_shards(embedder, images, indices, paths, work_dir, **kw)
    if process == 0:  # settles work.json and wipes a stale job's shards before anyone writes
        embed_to_shards(embedder, images, indices, paths, work_dir, select=lambda s: False,
                        **kw)
    barrier("index_work_ready")
    embed_to_shards(embedder, images, indices, paths, work_dir,
                    select=_own_shards(process, count), **kw)
    barrier("shards_embedded")
    if process != 0:
        return None
    return embed_to_shards(embedder, images, indices, paths, work_dir, **kw)
