"""Top-k retrieval evaluation: search the gallery with each query and score the ranked labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from facejax.errors import ConfigError, DataError
from facejax.retrieval import metrics as M
from facejax.retrieval.index import SearchIndex, drop_self

# mAP@R needs R results per query; past this many, AP is computed on a truncated list (noted).
MAP_R_CAP = 1000
FIGURE_TOPK = 5


def check_ks(ks) -> list[int]:
    """`eval.ks` as a sorted list of distinct whole numbers >= 1; ConfigError otherwise."""
    try:
        items = list(ks)
    except TypeError:
        items = None
    # bool is an int subclass and a float like 1.5 would silently truncate: refuse both.
    if not items or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                        for k in items):
        raise ConfigError(f"eval.ks must be a non-empty list of whole numbers >= 1, "
                          f"got {ks!r}")
    return sorted({int(k) for k in items})


def check_num_examples(num) -> int:
    """`eval.num_figure_queries` as an int >= 0; ConfigError otherwise."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ConfigError(f"eval.num_figure_queries must be a whole number >= 0, got {num!r}")
    return int(num)


def evaluate_embeddings(query_emb: np.ndarray, query_labels: np.ndarray, index: SearchIndex,
                        *, ks: Sequence[int] = (1, 5, 10), self_rows: np.ndarray | None = None,
                        query_paths: Sequence[str] | None = None,
                        names: Mapping[int, str] | None = None, protocol: str = "closed_set",
                        num_examples: int = 6, seed: int = 0) -> dict:
    """Scores `index.search(query_emb)` against the labels; the result is JSON-ready.

    `self_rows[i]` is the index row that holds query i itself (leave-one-out), -1 if none; it
    is dropped from the results and from the relevant count. Queries that are unlabelled (-1)
    or have no relevant gallery item cannot score and are counted, not averaged.
    """
    query_emb = np.asarray(query_emb, np.float32)
    query_labels = np.asarray(query_labels, np.int64)
    q = len(query_labels)
    if len(query_emb) != q:
        raise DataError(f"{len(query_emb)} query embeddings but {q} labels")
    ks = check_ks(ks)
    num_examples = check_num_examples(num_examples)
    loo = self_rows is not None
    self_rows = np.full(q, -1, np.int64) if self_rows is None else np.asarray(self_rows, np.int64)
    has_self = (self_rows >= 0)
    num_rel = M.count_relevant(query_labels, index.labels)
    num_rel = np.maximum(num_rel - (has_self & (query_labels >= 0)), 0)
    available = index.size - (1 if has_self.any() else 0)
    if ks[-1] > available:
        raise DataError(f"k={ks[-1]} but the gallery has only {available} items to rank"
                        f"{' (besides the query itself)' if has_self.any() else ''}")
    max_r = min(int(num_rel.max(initial=0)), MAP_R_CAP)
    depth = min(available, max(ks[-1], FIGURE_TOPK, max_r))
    extra = 1 if has_self.any() else 0

    def run(exact: bool):
        rows, scores = index.search(query_emb, depth + extra, exact=exact)
        if extra:
            rows, scores = drop_self(rows, scores, self_rows, depth)
        return rows, scores

    rows, scores = run(exact=False)
    retrieved = np.where(rows >= 0, index.labels[np.maximum(rows, 0)], -1)
    rel = M.relevance(retrieved, query_labels)
    per_q = M.per_query_metrics(rel, num_rel, ks)
    valid = num_rel > 0
    if names is None:
        names = names_from_paths(index.labels, index.paths)

    ann = None
    if index.backend != "exact" and q:
        exact_rows, _ = run(exact=True)
        ann = {f"recall@{k}": M.ann_recall_at_k(rows, exact_rows, k) for k in ks}

    result = dict(
        protocol=protocol,
        leave_one_out=loo,
        num_queries=int(valid.sum()),
        num_queries_total=int(q),
        num_queries_unlabelled=int((query_labels < 0).sum()),
        num_queries_without_relevant=int(((query_labels >= 0) & ~valid).sum()),
        gallery_size=int(available),
        num_identities=len(np.unique(query_labels[valid])),
        ks=ks,
        metrics=M.summarize(per_q, valid),
        map_r_truncated=int((num_rel > depth).sum()),
        ann_recall=ann,
        backend=index.backend,
        index_params=index.scann_params,
        embedder=dict(index.embedder),
        per_class=M.per_class(per_q, query_labels, valid, names),
        examples=_examples(rows, scores, query_labels, valid, index, query_paths, names,
                           num_examples, seed),
    )
    return result


def _examples(rows, scores, query_labels, valid, index, query_paths, names, num, seed):
    """A seeded sample of queries with their top results, for the report's figure."""
    if not num or query_paths is None or not valid.any():
        return []
    pool = np.flatnonzero(valid)
    pick = np.sort(np.random.default_rng(seed).choice(pool, size=min(num, len(pool)),
                                                      replace=False))
    out = []
    for i in pick:
        label = int(query_labels[i])
        results = []
        for r, s in zip(rows[i, :FIGURE_TOPK], scores[i, :FIGURE_TOPK]):
            if r < 0:
                continue
            g = int(index.labels[r])
            results.append(dict(path=index.paths[r], label=g, name=names.get(g, str(g)),
                                score=float(s), correct=bool(g == label and g >= 0)))
        out.append(dict(query=query_paths[i], label=label, name=names.get(label, str(label)),
                        results=results))
    return out


def names_from_paths(labels: np.ndarray, paths: Sequence[str]) -> dict[int, str]:
    """label -> parent folder name, when the folders name the labels one-to-one."""
    names: dict[int, str] = {}
    for label, path in zip(np.asarray(labels).tolist(), paths):
        if label < 0:
            continue
        folder = os.path.basename(os.path.dirname(path))
        if names.setdefault(label, folder) != folder:
            return {}
    if len(set(names.values())) != len(names):
        return {}
    return names


def evaluate(embedder, data, *, ks: Sequence[int] = (1, 5, 10), index: SearchIndex | None = None,
             backend: str = "auto", exact_max_items: int = 200_000, target_recall: float = 0.0,
             batch_size: int = 256, num_examples: int = 6, seed: int = 0,
             progress: bool = False, query_emb: np.ndarray | None = None) -> dict:
    """Evaluates an `Embedder` on `PreparedData`-like `data` (images, paths, query, gallery).

    `data.gallery is None` means leave-one-out over `data.query`. Without `index`, one is
    built over the gallery with `backend`; a given index must hold the gallery's paths.
    `query_emb` reuses query embeddings the caller already has.
    """
    # Checked before any embedding work, so a bad setting fails in a second, not an hour.
    ks = check_ks(ks)
    num_examples = check_num_examples(num_examples)
    loo = data.gallery is None
    gallery = data.query if loo else data.gallery
    g_paths = [data.paths[i] for i in gallery.indices]
    q_paths = [data.paths[i] for i in data.query.indices]
    if index is None:
        g_emb = embedder.embed_array(data.images, batch_size=batch_size, progress=progress,
                                     indices=gallery.indices)
        index = SearchIndex.build(g_emb, g_paths, gallery.labels, embedder.meta,
                                  backend=backend, exact_max_items=exact_max_items,
                                  target_recall=target_recall, k=max(ks), seed=seed)
    row_of = {p: r for r, p in enumerate(index.paths)}
    missing = [p for p in g_paths if p not in row_of]
    if missing:
        raise DataError(f"the index lacks {len(missing)} of the {len(g_paths)} gallery images "
                        f"(e.g. {missing[0]}); it was built over other data: rebuild it")
    self_rows = None
    if loo:
        self_rows = np.array([row_of[p] for p in q_paths], np.int64)
        q_emb = index.embeddings[self_rows] if query_emb is None else query_emb
    elif query_emb is not None:
        q_emb = query_emb
    else:
        q_emb = embedder.embed_array(data.images, batch_size=batch_size, progress=progress,
                                     indices=data.query.indices)
    # Query/gallery labels index identity_names (PreparedData); else try the folder names.
    label_names = getattr(data, "identity_names", None)
    names = dict(enumerate(label_names)) if label_names else None
    return evaluate_embeddings(q_emb, data.query.labels, index, ks=ks, self_rows=self_rows,
                               query_paths=q_paths, names=names,
                               protocol=getattr(data, "protocol", "closed_set"),
                               num_examples=num_examples, seed=seed)


def result_summary(result: Mapping[str, Any]) -> str:
    """One line: protocol, counts and the headline metrics (or why nothing was scored)."""
    m = result["metrics"]
    setting = f"{result['protocol']}{' (leave-one-out)' if result['leave_one_out'] else ''}"
    if not result["num_queries"]:
        return (f"{setting}: none of the {result['num_queries_total']} queries could be scored "
                f"({result['num_queries_unlabelled']} unlabelled, "
                f"{result['num_queries_without_relevant']} without an image of their identity "
                f"in the gallery)")
    tops = " ".join(f"Top-{k}={m[f'top{k}']:.4f}" for k in result["ks"])
    return (f"{setting}: {result['num_queries']} queries, gallery {result['gallery_size']}: "
            f"{tops} mAP@R={m['map@r']:.4f}")
