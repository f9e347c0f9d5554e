"""`build_workdir_index`: embed a run's gallery with its exported embedder and save
`workdir/index/`."""

from __future__ import annotations

import os
import shutil

from facejax.errors import ConfigError, DataError
from facejax.retrieval import multihost
from facejax.retrieval.embed import load_embedder
from facejax.retrieval.evaluate import check_ks
from facejax.retrieval.index import (BACKENDS, DEFAULT_TARGET_RECALL, SearchIndex,
                                     check_scann_dims_per_block, check_scann_init,
                                     check_target_recall, load_index)
from facejax.retrieval.run_data import prepare_run_data
from facejax.rundir import EMBEDDER_DIR, INDEX_DIR
from facejax.rundir import INDEX_WORK_DIR as WORK_DIR

SHARD_SIZE = 16384  # gallery items per resumable embedding shard (index_work/shard_*.npy)


def _names(data) -> list[str]:
    return list(getattr(data, "identity_names", None) or data.class_names)


def build_workdir_index(workdir: str, config, *, backend: str | None = None,
                        target_recall: float | None = None, progress: bool = True,
                        shard_size: int = SHARD_SIZE) -> SearchIndex:
    """Embeds the gallery (resumably, in shards) and saves `workdir/index/`.

    The gallery is the protocol's gallery subset, or the query subset for leave-one-out.
    `backend` and `target_recall` default to the run's `index` settings. A ScaNN index is
    always tuned: a target of 0 (no tuning, the default of runs saved before tuning was)
    means DEFAULT_TARGET_RECALL. Holds the run's lock: not while it trains or is served.
    In a multi-process job (facejax.cluster) every process embeds its share of the shards and
    process 0 builds and saves the index; every process returns the saved index.
    """
    import jax

    from facejax.runlock import hold_workdir_lock

    with hold_workdir_lock(workdir, "build_index", process_index=jax.process_index()):
        return _build_workdir_index(workdir, config, backend=backend,
                                    target_recall=target_recall, progress=progress,
                                    shard_size=shard_size)


def _build_workdir_index(workdir: str, config, *, backend: str | None, target_recall,
                         progress: bool, shard_size: int) -> SearchIndex:
    backend = backend or config.index.backend
    target = config.index.target_recall if target_recall is None else target_recall
    # Checked before the (long) embedding pass.
    if backend not in BACKENDS:
        raise ConfigError(f"index.backend must be one of {BACKENDS}, got {backend!r}")
    check_target_recall(target)
    untuned, target = not target, target or DEFAULT_TARGET_RECALL
    init = check_scann_init(config.index.scann_init)
    ah = check_scann_dims_per_block(config.index.scann_dims_per_block)
    ks = check_ks(config.eval.ks)
    milvus = _milvus_options(workdir, config) if backend == "milvus" else None
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    data = prepare_run_data(config, embedder)
    loo = data.gallery is None
    gallery = data.query if loo else data.gallery
    if len(gallery) == 0:
        raise DataError("the gallery is empty: nothing to index")
    paths = [data.paths[i] for i in gallery.indices]
    work = os.path.join(workdir, WORK_DIR)
    if not 1 <= shard_size <= 1 << 24:
        raise ConfigError(f"shard_size {shard_size} must be in 1..{1 << 24}")
    emb = multihost.embed_gallery(embedder, data.images, gallery.indices, paths, work,
                                  shard_size=shard_size, batch_size=config.index.embed_batch_size,
                                  progress=progress)
    if emb is None:  # another process of the job builds the index from the shards
        multihost.barrier("index_saved")
        return load_index(os.path.join(workdir, INDEX_DIR), expect=embedder.meta)
    info = dict(root=data.root, source=config.data.source, protocol=data.protocol,
                leave_one_out=loo, label_names=_names(data), data_id=data.data_id,
                embedded_by_processes=multihost.process_count())
    index = SearchIndex.build(emb, paths, gallery.labels, embedder.meta, backend=backend,
                              exact_max_items=config.index.exact_max_items,
                              target_recall=target, k=ks[-1], info=info,
                              scann_params=dict(init=init, **ah), seed=config.seed, milvus=milvus)
    if untuned and index.backend == "scann":
        print(f"note: index.target_recall=0 (no tuning) is read as {target}: ScaNN indexes are "
              f"always tuned", flush=True)
    if target_recall and index.backend == "exact":
        print(f"note: target_recall={target} does not apply: the index uses exact search "
              f"(recall 1 by construction; {index.size} items, backend {backend!r}, "
              f"exact_max_items={config.index.exact_max_items})", flush=True)
    index.save(os.path.join(workdir, INDEX_DIR))
    shutil.rmtree(work, ignore_errors=True)  # the saved index holds every embedding now
    multihost.barrier("index_saved")
    return index


def _milvus_options(workdir: str, config) -> dict:
    """index.milvus_* checked before the embedding pass: a bad URI fails in seconds."""
    from facejax.retrieval import milvus_index as mi

    uri = config.index.milvus_uri or os.path.join(os.path.abspath(workdir), "milvus.db")
    collection = config.index.milvus_collection or mi.default_collection(workdir)
    opts = dict(uri=mi.check_uri(uri), collection=mi.check_collection_name(collection),
                index_type=mi.check_index_type(config.index.milvus_index))
    mi.connect(uri).close()
    return opts

