"""Gallery index: exact (chunked matmul top-k on device) or ScaNN (tree + AH + reorder).

A `SearchIndex` keeps the gallery embeddings, paths, labels and stable integer ids beside the
searcher, so it can answer exact queries (for ANN recall), grow, shrink and rebuild itself.
`search` returns row positions into `index.paths / labels / ids` as they are at that moment.

Saved layout (`workdir/index/`, written atomically):
  manifest.json   backend, count, dim, the embedder's identity, ScaNN params, tuning, info,
                  `files` (size and sha256 of every other file) and its own `manifest_sha256`
  embeddings.npy  float32 [N, D]     labels.npy int32 [N]    ids.npy int64 [N]
  paths.json      list of N gallery paths
  scann/          ScaNN's own serialization (relative paths) + order.npy: ids in ScaNN's order

Every load checks the file sizes and hashes before parsing anything (integrity.py); indexes
saved before the hashes existed load with a note and get them on their next save.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from facejax import compat
from facejax.atomic import atomic_dir
from facejax.errors import CheckpointError, ConfigError, DataError
from facejax.retrieval import integrity
from facejax.rundir import migrate_embedder_meta, read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BACKENDS = ("auto", "exact", "scann", "milvus")
# The embedder fields an index depends on; a mismatch on load is refused.
EMBEDDER_FIELDS = ("model", "params_hash", "embed_dim", "normalization", "l2_normalized",
                   "metric", "cache_size", "resize_mode")
# Below this many items ScaNN scores by brute force: AH and a tree need data to train on.
_SCANN_MIN_TREE = 1000
# Rebuild ScaNN when the item count has drifted this far from the count it was trained on.
_REBUILD_RATIO = 2.0
# ScaNN indexes tune to this recall@k against exact search unless told otherwise: ScaNN's
# untuned shape (~sqrt(N) leaves, 5% searched) reached recall@10 of only 0.56 on a 1,362-face
# gallery of 2 people (27 leaves, 2 searched), and tuning costs seconds at such sizes.
DEFAULT_TARGET_RECALL = 0.95
_FIX = "rebuild it with scripts/build_index.py"


# ----------------------------------------------------------------------------- exact search

# Rows of a score chunk are cut into groups of this many columns for the group-max top-k.
_GROUP = 32


def _chunk_topk(s, idx, k):
    """Exact top-k of each row of `s[q, c]` (column ids `idx[c]`), without a top-k over all c.

    The k largest entries of a row lie in the k groups with the largest maxima: an entry outside
    them has k group maxima (k other entries) at least as large. So take the max of each
    `_GROUP`-column group, the top-k groups by max, and the top-k of their k*_GROUP entries: the
    two top-k calls see c/_GROUP and k*_GROUP columns instead of c. Measured against
    `lax.top_k` over the whole chunk: 3.6-6.8x on an H100, 1.3x on a 2-core CPU.
    """
    qb, c = s.shape
    if c % _GROUP or c // _GROUP < k:
        top, pos = jax.lax.top_k(s, k)
        return top, idx[pos]
    groups = s.reshape(qb, c // _GROUP, _GROUP)
    _, top_groups = jax.lax.top_k(groups.max(axis=2), k)                 # [q, k]
    cand = jnp.take_along_axis(groups, top_groups[:, :, None], axis=1)  # [q, k, G]
    cand_i = top_groups[:, :, None] * _GROUP + jnp.arange(_GROUP, dtype=jnp.int32)
    top, pos = jax.lax.top_k(cand.reshape(qb, k * _GROUP), k)
    return top, idx[jnp.take_along_axis(cand_i.reshape(qb, k * _GROUP), pos, axis=1)]


@functools.partial(jax.jit, static_argnames=("k",))
def _topk_chunked(queries, chunks, count, k):
    """Top-k by dot product over `chunks[C, chunk, D]`, merging a running top-k per chunk.

    Only the last chunk holds padding rows past `count`, so only its scores are masked: against
    masking every chunk that was 1.15x (100k x 128) and 1.14x (1M x 128) on a 2-core CPU,
    medians of interleaved runs (BENCHMARKS.md).
    """
    qb, csize = queries.shape[0], chunks.shape[1]
    last = chunks.shape[0] - 1

    def merge(carry, c, masked):
        best_s, best_i = carry
        s = jnp.dot(queries, chunks[c].T, precision=jax.lax.Precision.HIGHEST)
        idx = c * csize + jnp.arange(csize, dtype=jnp.int32)
        if masked:
            s = jnp.where(idx[None, :] < count, s, -jnp.inf)
        chunk_s, chunk_i = _chunk_topk(s, idx, k)
        all_s = jnp.concatenate([best_s, chunk_s], axis=1)
        all_i = jnp.concatenate([best_i, chunk_i], axis=1)
        top_s, pos = jax.lax.top_k(all_s, k)
        return top_s, jnp.take_along_axis(all_i, pos, axis=1)

    init = (jnp.full((qb, k), -jnp.inf, jnp.float32), jnp.full((qb, k), -1, jnp.int32))
    carry, _ = jax.lax.scan(lambda carry, c: (merge(carry, c, False), None), init,
                            jnp.arange(last, dtype=jnp.int32))
    scores, rows = merge(carry, last, True)
    return rows, scores


class ExactSearcher:
    """Brute-force top-k on the default device, in gallery chunks and fixed query batches."""

    def __init__(self, embeddings: np.ndarray, chunk_size: int | None = None,
                 query_batch: int | None = None):
        """`chunk_size` gallery rows per scan step and `query_batch` queries per device call;
        None picks by device: 8192 x 256 on a CPU, 32768 x 4096 on an accelerator, where the
        bigger shapes measured 2.4x the QPS at 1M x 128 on an H100 (BENCHMARKS.md)."""
        on_cpu = jax.default_backend() == "cpu"
        chunk_size = chunk_size or (8192 if on_cpu else 32768)
        query_batch = query_batch or (256 if on_cpu else 4096)
        n, d = embeddings.shape
        self.count, self.dim = n, d
        # Round the chunk to 256 rows so small galleries still get one well-shaped matmul.
        chunk = max(256, min(chunk_size, -(-max(n, 1) // 256) * 256))
        n_chunks = max(1, -(-n // chunk))
        padded = np.zeros((n_chunks * chunk, d), np.float32)
        padded[:n] = embeddings
        self._chunks = jax.device_put(padded.reshape(n_chunks, chunk, d))
        self._count = jnp.int32(n)
        self.query_batch = query_batch

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries, np.float32)
        # A power-of-two batch up to query_batch: one query does not pay for 256.
        qb = min(self.query_batch, 1 << max(0, (len(q) - 1).bit_length()))
        rows = np.empty((len(q), k), np.int64)
        scores = np.empty((len(q), k), np.float32)
        for start in range(0, len(q), qb):
            part = q[start:start + qb]
            pad = np.zeros((qb, self.dim), np.float32)
            pad[: len(part)] = part
            r, s = _topk_chunked(pad, self._chunks, self._count, k)
            rows[start:start + len(part)] = np.asarray(r)[: len(part)]
            scores[start:start + len(part)] = np.asarray(s)[: len(part)]
        return rows, scores


def exact_topk_numpy(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Reference top-k rows by dot product (NumPy argpartition); used by tests and the bench."""
    scores = queries @ gallery.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


# ----------------------------------------------------------------------------- ScaNN

def default_scann_params(n: int, k: int = 10) -> dict:
    """ScaNN's recommended shape (~sqrt(N) leaves, AH, reorder), with 1 dim per AH block."""
    num_leaves = max(1, min(round(math.sqrt(n)), n // 50)) if n >= _SCANN_MIN_TREE else 1
    return dict(
        num_leaves=num_leaves,
        leaves_to_search=max(1, min(num_leaves, math.ceil(num_leaves * 0.05))),
        reorder=max(100, 10 * k),
        training_sample_size=min(n, 100_000),
        # 1 dimension per AH block (16 centres each): codes twice the size of 2 per block, but
        # accurate enough that a reorder of 20-40 reaches recall 0.99; at 1M x 128 that was
        # 1.35x (recall 0.95) to 1.6x (0.99) the QPS of 2 per block (BUILD_NOTES.md).
        dims_per_block=1,
        aq_threshold=0.2,
        # Spherical k-means leaves (unit centres, the dot product's own geometry): on dlib's LFW
        # embeddings + noise at 300k, searching 1 leaf found 0.954 of the true top-10 instead
        # of 0.851, 2 leaves 0.987 instead of 0.942 (BENCHMARKS.md, bench/ann_recall_curve.py).
        spherical=True,
    )


def _build_scann(embeddings: np.ndarray, ids: np.ndarray, params: Mapping[str, Any]):
    import scann  # imported here: exact-only users never load its shared library

    n = len(embeddings)
    builder = scann.scann_ops_pybind.builder(embeddings, 10, "dot_product")
    if n < _SCANN_MIN_TREE:
        builder = builder.score_brute_force()
    else:
        if params["num_leaves"] > 1:
            builder = builder.tree(num_leaves=params["num_leaves"],
                                   num_leaves_to_search=params["leaves_to_search"],
                                   training_sample_size=params["training_sample_size"],
                                   spherical=bool(params.get("spherical", False)),
                                   random_init=_random_init(params))
        builder = builder.score_ah(params["dims_per_block"],
                                   anisotropic_quantization_threshold=params["aq_threshold"])
        reorder_type = params.get("reorder_dtype", "float32")
        types = {"float32": scann.ReorderType.FLOAT32,
                 "int8": scann.ReorderType.INT8,
                 "bfloat16": scann.ReorderType.BFLOAT16}
        if reorder_type not in types:
            raise ConfigError(f"scann reorder_dtype must be one of {sorted(types)}, got "
                              f"{reorder_type!r}")
        builder = builder.reorder(params["reorder"], quantize=types[reorder_type])
    return builder.build(docids=_docids(ids))


def _docids(ids) -> list[str]:
    """ScaNN's docids (strings, required for upsert and delete): our int64 ids as text."""
    return [str(int(i)) for i in ids]


SCANN_INITS = ("random", "kmeans++")
# AH shapes (dimensions per AH block) a tuned build tries unless scann_params sets one: the
# faster at the target recall is kept (SearchIndex.tune_ah_shape).
AH_SHAPES = (1, 2)
# Build options a rebuild (after many adds or removes) carries over from the first build.
_KEPT_BUILD_OPTIONS = ("spherical", "reorder_dtype", "init")


def _random_init(params: Mapping[str, Any]) -> bool:
    """Leaf k-means seeding: "random" (ScaNN's default) or "kmeans++".

    With random seeding, builds of one 1M x 128 gallery differed from run to run: 5 of 8
    reached recall 0.99 at 2 leaves, 3 needed 5-15 (the tuner measures each build, so only the
    speed varies). k-means++ seeding gave the same index three times out of three, at 0.99
    with 2 leaves, for a 20-35% longer build (BUILD_NOTES.md).
    """
    return check_scann_init(params.get("init", "random")) == "random"


def check_scann_dims_per_block(dims) -> dict:
    """index.scann_dims_per_block -> the scann_params it sets ({} for 0: try AH_SHAPES)."""
    if isinstance(dims, bool) or dims not in (0, *AH_SHAPES):
        raise ConfigError(f"index.scann_dims_per_block must be 0 (try {AH_SHAPES} and keep the "
                          f"faster) or one of {AH_SHAPES}, got {dims!r}")
    return {"dims_per_block": int(dims)} if dims else {}


def check_scann_init(init) -> str:
    if init not in SCANN_INITS:
        raise ConfigError(f"index.scann_init (ScaNN's leaf seeding) must be one of "
                          f"{SCANN_INITS}, got {init!r}")
    return init


def _load_scann(path: str, order: np.ndarray):
    """ScaNN's `load_searcher` on a saved `scann/` folder, with the docids from `order`.

    `load_searcher` unpickles `scann_docids.pkl` when there is one; facejax never writes it
    (the ids live in order.npy), so the caller refuses a folder that holds one.
    """
    import scann

    loaded = scann.scann_ops_pybind.load_searcher(path, assets_backcompat_shim=False)
    return compat.scann_with_docids(loaded, _docids(order))


# ----------------------------------------------------------------------------- the index

class SearchIndex:
    """Gallery embeddings + metadata + a searcher ('exact' or 'scann')."""

    def __init__(self, embeddings, paths, labels, ids, embedder: Mapping[str, Any], backend: str,
                 *, scann_params: dict | None = None, tuning: dict | None = None,
                 info: dict | None = None, next_id: int | None = None, built_count: int = 0,
                 searcher=None, scann_order: np.ndarray | None = None, milvus=None):
        self.embeddings = np.ascontiguousarray(embeddings, np.float32)
        self.paths = list(paths)
        self.labels = np.asarray(labels, np.int32)
        self.ids = np.asarray(ids, np.int64)
        embedder = migrate_embedder_meta(embedder)  # an older index's manifest, or meta
        self.embedder = {k: embedder.get(k) for k in EMBEDDER_FIELDS}
        self.backend = backend
        self.scann_params = scann_params
        self.tuning = tuning
        self.info = dict(info or {})
        if next_id is None:
            next_id = int(self.ids.max()) + 1 if len(self.ids) else 0
        self.next_id = int(next_id)
        self.built_count = built_count or len(self.ids)
        self._exact: ExactSearcher | None = None
        self._scann = searcher
        self._scann_rows: np.ndarray | None = None
        self._scann_positions = None  # the same ScaNN searcher, answering positions
        self._milvus = milvus  # a milvus_index.MilvusStore for backend 'milvus'
        if backend == "scann":
            if self._scann is None:
                self._scann = _build_scann(self.embeddings, self.ids, self.scann_params)
            self._sync_scann_rows(scann_order)

    # -- construction

    @classmethod
    def build(cls, embeddings: np.ndarray, paths: Sequence[str], labels, embedder_meta,
              *, backend: str = "auto", exact_max_items: int = 200_000,
              target_recall: float | None = None, k: int = 10,
              tune_queries: np.ndarray | None = None,
              scann_params: Mapping[str, Any] | None = None, info: dict | None = None,
              seed: int = 0, milvus: Mapping[str, Any] | None = None) -> SearchIndex:
        """Builds an index over `embeddings[N, D]` (row i is `paths[i]`, `labels[i]`).

        backend 'auto' is exact up to `exact_max_items` items, ScaNN above. A ScaNN index
        tunes leaves_to_search and reorder to reach `target_recall` (None:
        DEFAULT_TARGET_RECALL) recall@k against exact search, on `tune_queries` or on gallery
        items left out in turn; `index.tuning["met"]` says whether it got there. Unless
        `scann_params` sets `dims_per_block` or k-means++ seeding (identical rebuilds), it is
        built and tuned once per AH shape in AH_SHAPES and the faster kept (`tune_ah_shape`:
        twice the build time). 0 keeps
        ScaNN's untuned shape (for benchmarks of that shape; nothing is measured then).
        backend 'milvus' puts the gallery in the collection `milvus` names (uri, collection,
        index_type; milvus_index.py) and measures its recall@k against exact search.
        """
        embeddings = _check_embeddings(embeddings, embedder_meta)
        n = len(embeddings)
        if n == 0:
            raise DataError("cannot build an index over an empty gallery")
        if len(paths) != n:
            raise DataError(f"{n} embeddings but {len(paths)} paths")
        labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        if labels.shape != (n,):
            raise DataError(f"{n} embeddings but labels of shape {labels.shape}")
        if backend not in BACKENDS:
            raise ConfigError(f"index backend must be one of {BACKENDS}, got {backend!r}")
        if target_recall is None:
            target_recall = DEFAULT_TARGET_RECALL if backend != "exact" else 0.0
        check_target_recall(target_recall)
        if backend == "auto":
            backend = "exact" if n <= exact_max_items else "scann"
        params = None
        if backend == "scann":
            params = default_scann_params(n, k)
            params.update(scann_params or {})
            if check_scann_init(params.get("init", "random")) == "kmeans++" and \
                    "spherical" not in (scann_params or {}):
                # k-means++ is chosen for identical rebuilds; spherical leaves seeded by it
                # differed from build to build (tests/test_index.py), generic ones did not.
                params["spherical"] = False
        index = cls(embeddings, paths, labels, np.arange(n, dtype=np.int64), embedder_meta,
                    backend, scann_params=params, info=info)
        if backend == "milvus":
            from facejax.retrieval import milvus_index

            milvus_index.build_for(index, milvus or {}, k=k, seed=seed)
        elif backend == "scann" and target_recall > 0 and n >= 2:
            truth_cache: dict = {}  # the exact answers, shared by the AH-shape trial's tunes
            index.tune(target_recall, k=k, queries=tune_queries, seed=seed,
                       truth_cache=truth_cache)
            # The trial keeps the shape that timed faster, so k-means++ builds (chosen for
            # identical rebuilds) skip it and keep the default shape.
            if "dims_per_block" not in (scann_params or {}) and n >= _SCANN_MIN_TREE and \
                    _random_init(params):
                index.tune_ah_shape(target_recall, k=k, queries=tune_queries, seed=seed,
                                    truth_cache=truth_cache)
        elif target_recall > 0:
            # Exact search has recall 1 by construction: there is nothing to tune.
            log.info("target_recall=%s does not apply: the index uses exact search", target_recall)
        return index

    # -- queries

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def search(self, queries: np.ndarray, k: int, *, exact: bool = False,
               leaves_to_search: int | None = None, reorder: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (int64 [Q,k]) and dot-product scores (f32 [Q,k]), best first.

        A ScaNN search that finds fewer than k items pads with row -1 and score -inf.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"queries must be [Q, {self.dim}]; got shape {queries.shape}")
        check_k(k, self.size)
        if len(queries) == 0:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        if exact or self.backend == "exact":
            if self._exact is None:
                self._exact = ExactSearcher(self.embeddings)
            return self._exact.search(queries, k)
        if self.backend == "milvus":
            from facejax.retrieval.milvus_index import rows_of

            found, scores = self._milvus.search(queries, k)
            return rows_of(self._milvus, found, self.ids), scores
        p = self.scann_params
        leaves = leaves_to_search or p["leaves_to_search"]
        pre = max(k, reorder or p["reorder"])
        # The docid-free view answers with ScaNN's positions as arrays (`_scann_rows` maps them
        # to rows); the docid searcher would turn every result into a Python string.
        search = (self._scann_positions.search_batched_parallel if len(queries) >= 64
                  else self._scann_positions.search_batched)
        idx, dist = search(queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre,
                           leaves_to_search=leaves)
        # ScaNN pads missing neighbours with index 0 and NaN distance.
        missing = ~np.isfinite(dist)
        rows = self._scann_rows[np.asarray(idx, np.int64)]
        rows[missing] = -1
        scores = np.where(missing, -np.inf, dist).astype(np.float32)
        return rows, scores

    def tune(self, target_recall: float, *, k: int = 10, queries: np.ndarray | None = None,
             num_queries: int | None = None, seed: int = 0,
             truth_cache: dict | None = None) -> dict:
        """Picks the fastest (leaves_to_search, reorder) whose recall@k vs exact >= target.

        Without `queries`, a seeded sample of gallery items queries the rest of the gallery,
        each leaving itself out: real in-distribution points, and no free self-match that
        would flatter the recall. The sample is `num_queries` items, by default
        `default_tune_queries(target_recall)`. `truth_cache` (a dict) keeps the exact answers
        for another tune of the same gallery with the same arguments (tune_ah_shape).
        """
        if self.backend != "scann":
            raise ConfigError("target_recall tuning applies to the scann backend only")
        if not target_recall:
            raise ConfigError("target_recall must be in (0, 1], got 0")
        check_target_recall(target_recall)
        if queries is None:
            k = min(k, self.size - 1)
            rng = np.random.default_rng(seed)
            num_queries = default_tune_queries(target_recall) if num_queries is None \
                else num_queries
            if isinstance(num_queries, bool) or not isinstance(num_queries, (int, np.integer)) \
                    or num_queries < 1:
                raise ConfigError(f"num_queries must be a positive integer, got {num_queries!r}")
            self_rows = rng.choice(self.size, size=min(num_queries, self.size), replace=False)
            queries = self.embeddings[self_rows]
            extra = 1
        else:
            k = min(k, self.size)
            queries, self_rows, extra = np.asarray(queries, np.float32), None, 0
        if k < 1:
            raise DataError("the gallery is too small to tune the search")

        def run(**kw):
            rows, scores = self.search(queries, k + extra, **kw)
            return rows if self_rows is None else drop_self(rows, scores, self_rows, k)[0]

        truth = None if truth_cache is None else truth_cache.get("truth")
        if truth is None:
            truth = run(exact=True)
            if truth_cache is not None:
                truth_cache["truth"] = truth
        result = tune_search_params(
            lambda leaves, reorder: run(leaves_to_search=leaves, reorder=reorder),
            truth, k, target_recall, self.scann_params["num_leaves"], self.size, len(queries))
        result["queries"] = "gallery items, leave-one-out" if self_rows is not None else "given"
        result["gallery_size"] = self.size
        self.scann_params.update(leaves_to_search=result["leaves_to_search"],
                                 reorder=result["reorder"])
        self.tuning = result
        return result

    def tune_ah_shape(self, target_recall: float, *, k: int = 10,
                      queries: np.ndarray | None = None, seed: int = 0,
                      shapes: Sequence[int] = AH_SHAPES, truth_cache: dict | None = None
                      ) -> dict:
        """Builds the index once per AH shape (dimensions per AH block) in `shapes`, tunes each
        to `target_recall` on the same queries and keeps the fastest that meets it.

        Which shape is faster depends on the data: on clustered synthetic galleries 1 dimension
        per block needed a reorder of 20-40 and was 1.35-1.6x the QPS of 2; on real face
        embeddings (dlib, LFW + noise) the recall is bounded by the leaves searched, the reorder
        stops paying at ~50 for both shapes, and 2 per block (half the codes to scan) was faster
        (BENCHMARKS.md). Each shape is a full build. `tuning["ah_shapes"]` lists what each gave.
        """
        if self.backend != "scann" or self.size < _SCANN_MIN_TREE:
            raise ConfigError("AH shape tuning applies to scann indexes of at least "
                              f"{_SCANN_MIN_TREE} items")
        # Every shape is tuned on the same queries against the same exact answers, computed
        # once (at 1M x 128 they took ~8 s of each tune). `truth_cache` may hold them already
        # (from a `tune` with the same arguments on this gallery).
        truth_cache = {} if truth_cache is None else truth_cache
        if self.tuning is None or self.tuning.get("target_recall") != target_recall:
            self.tune(target_recall, k=k, queries=queries, seed=seed, truth_cache=truth_cache)
        tried = {self.scann_params["dims_per_block"]: self._shape_state()}
        for dims in shapes:
            if dims in tried:
                continue
            state = self._shape_state()
            self.scann_params = dict(state["params"], dims_per_block=dims)
            self._scann = _build_scann(self.embeddings, self.ids, self.scann_params)
            self._sync_scann_rows()
            self.tune(target_recall, k=k, queries=queries, seed=seed, truth_cache=truth_cache)
            tried[dims] = self._shape_state()
            self._set_shape_state(state)  # back to the first build until all are measured
        best = tried[faster_ah_shape({d: st["tuning"] for d, st in tried.items()})]
        self._set_shape_state(best)
        self.tuning = dict(best["tuning"], ah_shapes=[
            dict(dims_per_block=d, **{key: st["tuning"][key] for key in
                                      ("met", "recall", "qps", "leaves_to_search", "reorder")})
            for d, st in sorted(tried.items())])
        return self.tuning

    def _shape_state(self) -> dict:
        return dict(params=dict(self.scann_params), tuning=self.tuning, searcher=self._scann)

    def _set_shape_state(self, state: dict) -> None:
        self.scann_params, self.tuning, self._scann = dict(state["params"]), state["tuning"], \
            state["searcher"]
        self._sync_scann_rows()

    # -- updates

    def add(self, embeddings: np.ndarray, paths: Sequence[str], labels=None,
            ids: Sequence[int] | None = None) -> np.ndarray:
        """Appends items and returns their new ids; ScaNN gets them by upsert, no rebuild.

        Ids are `next_id, next_id + 1, ...` unless given: given ids (a log being replayed)
        must increase and start at `next_id` or above, so an id is never used twice.
        """
        embeddings = _check_embeddings(embeddings, self.embedder, dim=self.dim)
        n = len(embeddings)
        if len(paths) != n:
            raise DataError(f"{n} embeddings but {len(paths)} paths")
        labels = np.full(n, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
        if labels.shape != (n,):
            raise DataError(f"{n} embeddings but labels of shape {labels.shape}")
        if ids is None:
            new_ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids, np.int64)
            if new_ids.shape != (n,) or (n and (new_ids[0] < self.next_id
                                                or (np.diff(new_ids) <= 0).any())):
                raise DataError(f"ids for {n} new items must increase from next_id="
                                f"{self.next_id} or above, got {new_ids[:10].tolist()}")
        if self.backend == "milvus" and n:  # first: a refused write changes nothing here
            self._milvus.upsert(new_ids, embeddings, labels, paths)
        if n:
            self.next_id = int(new_ids[-1]) + 1
        self.embeddings = np.concatenate([self.embeddings, embeddings])
        self.paths.extend(paths)
        self.labels = np.concatenate([self.labels, labels])
        self.ids = np.concatenate([self.ids, new_ids])
        self._exact = None
        if self.backend == "scann" and n:
            if self._needs_rebuild():
                self._rebuild_scann()
            else:
                self._scann.upsert([str(int(i)) for i in new_ids], embeddings)
                self._sync_scann_rows()
        return new_ids

    def remove(self, ids: Sequence[int]) -> None:
        """Removes items by id (not by row); unknown ids raise DataError."""
        ids = np.unique(np.asarray(ids, np.int64))
        unknown = np.setdiff1d(ids, self.ids)
        if len(unknown):
            raise DataError(f"ids not in the index: {unknown[:10].tolist()}")
        keep = ~np.isin(self.ids, ids)
        if not keep.any():
            raise DataError("cannot remove every item from the index; build a new one instead")
        if self.backend == "milvus" and len(ids):
            self._milvus.delete(ids)
        self.embeddings = self.embeddings[keep]
        self.paths = [p for p, kept in zip(self.paths, keep) if kept]
        self.labels = self.labels[keep]
        self.ids = self.ids[keep]
        self._exact = None
        if self.backend == "scann" and len(ids):
            if self._needs_rebuild():
                self._rebuild_scann()
            else:
                self._scann.delete([str(int(i)) for i in ids])
                self._sync_scann_rows()

    def _needs_rebuild(self) -> bool:
        ratio = self.size / max(1, self.built_count)
        small = (self.size < _SCANN_MIN_TREE) != (self.built_count < _SCANN_MIN_TREE)
        return small or not 1 / _REBUILD_RATIO <= ratio <= _REBUILD_RATIO

    def _rebuild_scann(self) -> None:
        old = self.scann_params
        params = default_scann_params(self.size)
        # Keep the tuned search effort as a fraction of the leaves, and the reorder depth.
        frac = old["leaves_to_search"] / max(1, old["num_leaves"])
        params.update(leaves_to_search=max(1, min(params["num_leaves"],
                                                  math.ceil(frac * params["num_leaves"]))),
                      reorder=old["reorder"], dims_per_block=old["dims_per_block"],
                      aq_threshold=old["aq_threshold"],
                      **{key: old[key] for key in _KEPT_BUILD_OPTIONS if key in old})
        self.scann_params = params
        self._scann = _build_scann(self.embeddings, self.ids, params)
        self.built_count = self.size
        self._sync_scann_rows()
        # A new tree needs its own search effort: the kept fraction is only a starting point.
        # An index that was never tuned (saved before tuning was the default) is tuned now.
        tuned = self.tuning or {}
        self.tuning = None
        if self.size >= 2:
            self.tune(tuned.get("target_recall") or DEFAULT_TARGET_RECALL,
                      k=tuned.get("k") or 10)

    def _sync_scann_rows(self, order: np.ndarray | None = None) -> None:
        # ScaNN reorders items on delete (swap with last); map its positions to our rows.
        self._scann_positions = compat.scann_positions_view(self._scann)
        if order is None:
            order = np.array([int(d) for d in self._scann.docids], np.int64)
        row_of = {int(i): r for r, i in enumerate(self.ids)}
        try:
            self._scann_rows = np.array([row_of[int(i)] for i in order], np.int64)
        except KeyError as e:
            raise CheckpointError(f"the ScaNN searcher holds id {e} that the index does not") \
                from None
        if len(self._scann_rows) != self.size:
            raise CheckpointError(f"the ScaNN searcher holds {len(self._scann_rows)} items, "
                                  f"the index {self.size}")

    # -- persistence

    def manifest(self) -> dict:
        return dict(
            format_version=FORMAT_VERSION,
            backend=self.backend,
            count=self.size,
            dim=self.dim,
            metric="dot",
            embedder=self.embedder,
            scann=self.scann_params,
            tuning=self.tuning,
            info=self.info,
            next_id=self.next_id,
            built_count=self.built_count,
            labelled=int((self.labels >= 0).sum()),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )

    def save(self, path: str) -> None:
        """Writes the index to `path` atomically; an existing index there is replaced."""
        with atomic_dir(path) as tmp:
            np.save(os.path.join(tmp, "embeddings.npy"), self.embeddings)
            np.save(os.path.join(tmp, "labels.npy"), self.labels)
            np.save(os.path.join(tmp, "ids.npy"), self.ids)
            with open(os.path.join(tmp, "paths.json"), "w") as f:
                json.dump(self.paths, f)
            if self.backend == "scann":
                sdir = os.path.join(tmp, "scann")
                os.makedirs(sdir)
                # Serialized without docids (no pickle); order.npy holds them instead.
                self._scann_positions.serialize(sdir, relative_path=True)
                order = np.array([int(d) for d in self._scann.docids], np.int64)
                np.save(os.path.join(sdir, "order.npy"), order)
            manifest = self.manifest()
            if self.backend == "milvus":
                from facejax.retrieval.milvus_index import manifest_spec

                manifest["milvus"] = manifest_spec(self._milvus, path)
            # Hashed from the written files (the page cache): ~0.45 s per 512 MB (integrity.py).
            manifest["files"] = integrity.hash_files(tmp, integrity.files_under(tmp))
            # The manifest goes last: a directory with a manifest is a complete index.
            with open(os.path.join(tmp, "manifest.json"), "w") as f:
                json.dump(integrity.seal(manifest), f, indent=2)

    @classmethod
    def load(cls, path: str, expect: Mapping[str, Any] | None = None) -> SearchIndex:
        """Loads an index; with `expect` (an embedder's meta) refuses a mismatched embedder.

        Every file is checked against the sizes and sha256 hashes in the manifest before it is
        parsed; an index saved before the hashes existed loads with a note, after checks of
        its arrays' types, ranges and finiteness.
        """
        manifest = read_manifest(path)
        what = f"index {path}"
        hashed = "files" in manifest
        if hashed:
            integrity.verify_files(path, manifest["files"], what=what, fix=_FIX)
        else:
            print(f"note: {what} has no file hashes (saved by an older facejax), so damaged "
                  f"files may go unnoticed; {_FIX} to add them", flush=True)
        if expect is not None:
            check_embedder(manifest, expect, path)
        emb = _load_array(path, "embeddings.npy", np.float32)
        labels = _load_array(path, "labels.npy", np.int32)
        ids = _load_array(path, "ids.npy", np.int64)
        try:
            with open(os.path.join(path, "paths.json")) as f:
                paths = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{what}: paths.json is missing or damaged ({e}); "
                                  f"{_FIX}") from None
        n = manifest.get("count")
        if not (isinstance(paths, list) and emb.ndim == 2
                and len(emb) == len(labels) == len(ids) == len(paths) == n
                and emb.shape[1] == manifest.get("dim")):
            raise CheckpointError(f"index {path} is inconsistent: manifest says {n} items of dim "
                                  f"{manifest.get('dim')}, files hold {emb.shape}, "
                                  f"{len(labels)} labels, {len(ids)} ids, {len(paths)} paths; "
                                  f"{_FIX}")
        _check_contents(manifest, emb, labels, ids, paths, what, check_values=not hashed)
        searcher = order = None
        if manifest["backend"] == "scann":
            sdir = os.path.join(path, "scann")
            order = _load_array(sdir, "order.npy", np.int64, what=what, prefix="scann/")
            if os.path.lexists(os.path.join(sdir, compat.SCANN_DOCIDS_PICKLE)):
                raise CheckpointError(
                    f"{what}: scann/{compat.SCANN_DOCIDS_PICKLE} is a pickle, which facejax "
                    f"never writes or loads (unpickling can run code); delete it, or {_FIX}")
            try:
                searcher = _load_scann(sdir, order)
            except Exception as e:  # noqa: BLE001  (ScaNN's C++ errors: IndexError and others)
                raise CheckpointError(f"{what}: cannot load the ScaNN searcher in scann/ "
                                      f"({type(e).__name__}: {e}); {_FIX}") from None
        milvus = None
        if manifest["backend"] == "milvus":
            from facejax.retrieval.milvus_index import open_for

            milvus = open_for(manifest, path, emb, labels, ids, paths)
        return cls(emb, paths, labels, ids, manifest["embedder"], manifest["backend"],
                   scann_params=manifest.get("scann"), tuning=manifest.get("tuning"),
                   info=manifest.get("info"), next_id=manifest.get("next_id"),
                   built_count=manifest.get("built_count", n), searcher=searcher,
                   scann_order=order, milvus=milvus)


def check_k(k, size: int | None = None) -> None:
    """Raises DataError unless k is a whole number >= 1 and (given `size`) k <= size."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DataError(f"k must be a whole number of at least 1, got {k!r}")
    if size is not None and k > size:
        raise DataError(f"k={k} but the gallery has {size} items; ask for at most {size}")


def check_target_recall(target_recall) -> None:
    """Raises ConfigError unless `target_recall` is 0 (off) or in (0, 1]."""
    ok = (isinstance(target_recall, (int, float, np.integer, np.floating))
          and not isinstance(target_recall, bool)
          and (target_recall == 0 or 0 < target_recall <= 1))
    if not ok:
        raise ConfigError(f"target_recall must be in (0, 1] (or 0 for no tuning), "
                          f"got {target_recall!r}")


def read_manifest(path: str) -> dict:
    """The index's manifest.json, its own hash checked (when it has one)."""
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"no index at {path}; build one with scripts/build_index.py")
    manifest = read_json(mpath, f"{path} has no manifest.json: not an index, or an "
                                f"interrupted build; build it again", _FIX)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{mpath} is not a facejax index manifest of version "
                              f"{FORMAT_VERSION}")
    integrity.check_seal(manifest, mpath, _FIX)
    if manifest.get("backend") not in ("exact", "scann", "milvus"):
        raise CheckpointError(f"{mpath} names an unknown backend {manifest.get('backend')!r}")
    return manifest


def check_embedder(manifest: Mapping[str, Any], expect: Mapping[str, Any], path: str) -> None:
    """Raises CheckpointError naming each embedder field where the index and `expect` differ."""
    have = migrate_embedder_meta(manifest.get("embedder") or {})
    expect = migrate_embedder_meta(expect)
    diffs = []
    for key in EMBEDDER_FIELDS:
        if key in expect and have.get(key) != expect.get(key):
            a, b = have.get(key), expect.get(key)
            if key == "params_hash":
                a, b = str(a)[:12], str(b)[:12]
            diffs.append(f"{key} (index: {a}, embedder: {b})")
    if diffs:
        raise CheckpointError(f"index {path} was built by a different embedder: "
                              f"{'; '.join(diffs)}. Rebuild it with scripts/build_index.py")


def default_tune_queries(target_recall: float) -> int:
    """Tuning sample size: 1,000 queries, or 4,000 for a target of 0.98 and above.

    Near 0.99 the misses are rare whole queries (a query whose neighbours all sit in a leaf it
    did not search: at 1M x 128 about 4 in 1,000 queries had recall 0 at the cheapest settings
    and nearly all the rest recall 1), so a 1,000-query sample counts only a handful of them
    and 1,000-query samples of one setting on one index differed by up to 0.003-0.006. 4,000
    halves the standard error; their exact ground truth costs ~8 s at 1M x 128 on 2 CPU cores.
    """
    return 4000 if target_recall >= 0.98 else 1000


def faster_ah_shape(tunings: Mapping[int, Mapping[str, Any]]) -> int:
    """The AH shape to keep, of {dims_per_block: its tuning}: the fastest that met the target,
    else (none did) the most accurate."""
    return max(tunings, key=lambda d: (bool(tunings[d]["met"]), tunings[d]["qps"]
                                       if tunings[d]["met"] else tunings[d]["recall"]))


def tune_search_params(search_fn, truth: np.ndarray, k: int, target: float, num_leaves: int,
                       n: int, num_queries: int) -> dict:
    """Grid search over (leaves_to_search, reorder) for the fastest setting reaching `target`.

    For each leaves_to_search (ascending) it finds the smallest reorder whose recall, less two
    standard errors over the sampled queries, reaches the target; those candidates are then
    timed and the fastest wins. `search_fn(leaves, reorder)` returns rows [Q, k]. If no setting
    gets there, the cheapest whose plain recall reaches the target is kept, else the most
    accurate (and `met` is False).

    Why the margin: the tuning queries are a sample. At 1M x 128, 1,000-query samples of the same
    setting differed by up to 0.012 in recall (per-query standard error 0.005 at 0.95: a query's
    10 neighbours are found or missed together), and a setting that just reached 0.95 or 0.99
    on the sample missed it on other queries.
    """
    from facejax.retrieval.metrics import ann_recall_per_query

    leaves_grid = sorted({min(num_leaves, max(1, round(1.5 ** i))) for i in range(40)})
    reorder_grid = sorted({min(n, int(k * m)) for m in (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)})
    grid, candidates, after_first = [], [], 0
    for leaves in leaves_grid:
        for reorder in reorder_grid:
            per_query = ann_recall_per_query(search_fn(leaves, reorder), truth, k)
            recall = float(per_query.mean())
            lower = recall - 2.0 * float(per_query.std()) / math.sqrt(max(1, len(per_query)))
            grid.append(dict(leaves_to_search=leaves, reorder=reorder, recall=recall,
                             recall_lower=round(lower, 5)))
            if lower >= target:
                candidates.append(grid[-1])
                break
        if candidates:
            after_first += 1
            # More leaves at the smallest reorder cannot get cheaper; a few steps past the
            # first success is where trading leaves for reorder stops paying.
            if candidates[-1]["reorder"] == reorder_grid[0] or after_first > 3:
                break
    if not candidates:  # the margin is out of reach: the cheapest setting at the target, else
        candidates = [g for g in grid if g["recall"] >= target][:1] or \
            [max(grid, key=lambda g: (g["recall"], -g["leaves_to_search"]))]
    met = candidates[0]["recall"] >= target
    if not met:
        log.warning("ScaNN did not reach recall@%d=%.3f on any setting; best is %.4f",
                    k, target, candidates[0]["recall"])
    for c in candidates:
        c["qps"] = num_queries / _seconds_per_call(
            lambda c=c: search_fn(c["leaves_to_search"], c["reorder"]))
    best = max(candidates, key=lambda c: c["qps"])
    return dict(target_recall=target, k=k, met=met, num_queries=num_queries,
                leaves_to_search=best["leaves_to_search"], reorder=best["reorder"],
                recall=best["recall"], recall_lower=best["recall_lower"], qps=best["qps"],
                grid=grid)


def _seconds_per_call(fn, min_seconds: float = 0.05) -> float:
    """Best of 3 means over enough calls to last `min_seconds`: one 1,000-query ScaNN call takes
    ~10 ms, and single calls that short varied by +-30% between identical settings."""
    t0 = time.perf_counter()
    fn()
    reps = max(1, min(100, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-6))))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return max(best, 1e-9)


def drop_self(rows: np.ndarray, scores: np.ndarray, self_rows: np.ndarray, k: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Removes row `self_rows[i]` from result list i (else its last entry); keeps k, in order."""
    rows = np.asarray(rows)
    is_self = rows == np.asarray(self_rows)[:, None]
    # A stable sort on the "is self" flag moves the self entry to the end, order otherwise kept.
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)


def _check_embeddings(embeddings, meta: Mapping[str, Any], dim: int | None = None) -> np.ndarray:
    e = np.asarray(embeddings, np.float32)
    want = dim or meta.get("embed_dim")
    if e.ndim != 2 or (want is not None and e.shape[1] != want):
        raise DataError(f"embeddings must be [N, {want or 'D'}]; got shape {e.shape}")
    if not np.isfinite(e).all():
        raise DataError("embeddings contain NaN or inf; the model or its inputs are broken")
    return np.ascontiguousarray(e)


def _load_array(directory: str, name: str, dtype, *, what: str | None = None,
                prefix: str = "") -> np.ndarray:
    """np.load of one index array as `dtype`; CheckpointError naming the file otherwise."""
    what = what or f"index {directory}"
    try:
        a = np.load(os.path.join(directory, name), allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing {prefix}{name}; {_FIX}") from None
    # A 0-byte or torn file: EOFError; a damaged header: ValueError or SyntaxError.
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise CheckpointError(f"{what}: {prefix}{name} is damaged ({type(e).__name__}: {e}); "
                              f"{_FIX}") from None
    if a.dtype != dtype:
        raise CheckpointError(f"{what}: {prefix}{name} holds {a.dtype}, not {np.dtype(dtype)}; "
                              f"{_FIX}")
    return a


def _check_contents(manifest: Mapping[str, Any], emb: np.ndarray, labels: np.ndarray,
                    ids: np.ndarray, paths: list, what: str, check_values: bool) -> None:
    """Ranges every index satisfies; with `check_values` (no hashes) also finite embeddings."""
    names = (manifest.get("info") or {}).get("label_names") or []
    top = len(names) - 1 if names else np.iinfo(np.int32).max
    if len(labels) and (labels.min() < -1 or labels.max() > top):
        raise CheckpointError(f"{what}: labels.npy holds labels from {labels.min()} to "
                              f"{labels.max()}, outside -1..{top}; {_FIX}")
    next_id = manifest.get("next_id")
    if len(ids) and (ids.min() < 0 or (isinstance(next_id, int) and ids.max() >= next_id)
                     or len(np.unique(ids)) != len(ids)):
        raise CheckpointError(f"{what}: ids.npy holds negative, repeated or out-of-range ids "
                              f"(next_id {next_id}); {_FIX}")
    if not all(isinstance(p, str) for p in paths):
        raise CheckpointError(f"{what}: paths.json holds entries that are not paths; {_FIX}")
    if check_values and not np.isfinite(emb).all():
        raise CheckpointError(f"{what}: embeddings.npy holds NaN or inf; {_FIX}")


# Contract name (docs/CONTRACTS.md): build with SearchIndex.build, save with SearchIndex.save.
def load_index(path: str, expect: Mapping[str, Any] | None = None) -> SearchIndex:
    return SearchIndex.load(path, expect)
