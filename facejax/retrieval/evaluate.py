"""Top-k retrieval evaluation: search the gallery with each query and score the ranked labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from facejax.data import counts
from facejax.data.splits import MIN_OPEN_SET_IDENTITIES
from facejax.errors import ConfigError, DataError
from facejax.retrieval import metrics as M
from facejax.retrieval import rejection
from facejax.retrieval.index import DEFAULT_TARGET_RECALL, SearchIndex, drop_self

# mAP@R needs R results per query; past this many, AP is computed on a truncated list (noted).
MAP_R_CAP = 1000
FIGURE_TOPK = 5
# eval.exact_max_pairs: with an approximate index, the metrics come from exact search when
# queries x gallery items is at most this. mAP@R reads R results deep (hundreds per identity
# on a celebrity set), where an index tuned for recall@10 loses neighbours. 1e10 pairs is
# ~30 s at the ~3e8 pairs/s of exact search at 128-d on a 2-core CPU (1M x 128: ~300
# queries/s, README), well under a second per 1e9 on a GPU. Above it, ScaNN is tuned for the
# depth the metrics read.
EXACT_MAX_PAIRS = 10_000_000_000
# Queries that measure ANN recall (and the depth tuning) when exact search over all is too dear.
ANN_SAMPLE = 1000


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


def check_exact_max_pairs(value) -> int:
    """`eval.exact_max_pairs` as an int >= 0; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"eval.exact_max_pairs must be a whole number >= 0 (queries x "
                          f"gallery items scored by exact search), got {value!r}")
    return int(value)


def recall_target(index: SearchIndex) -> float:
    """The recall@k the index was tuned for, else the default target."""
    return float((index.tuning or {}).get("target_recall") or DEFAULT_TARGET_RECALL)


def evaluate_embeddings(query_emb: np.ndarray, query_labels: np.ndarray, index: SearchIndex,
                        *, ks: Sequence[int] = (1, 5, 10), self_rows: np.ndarray | None = None,
                        query_paths: Sequence[str] | None = None,
                        names: Mapping[int, str] | None = None, protocol: str = "closed_set",
                        num_examples: int = 6, seed: int = 0,
                        exact_max_pairs: int = EXACT_MAX_PAIRS, threshold: float | None = None,
                        threshold_source: str = "", rejection_holdout: float = 0.2) -> dict:
    """Scores the ranked gallery labels of each query; the result is JSON-ready.

    `self_rows[i]` is the index row that holds query i itself (leave-one-out), -1 if none; it
    is dropped from the results and from the relevant count. Queries that are unlabelled (-1)
    or have no relevant gallery item cannot score and are counted, not averaged.

    The ranking is exact search whenever queries x gallery items <= `exact_max_pairs` (the
    approximate index's own recall against it is reported in `ann_recall`); above that, the
    ScaNN index re-tuned for the depth the metrics read (`search` says which, and how well it
    did on a sample). `warnings` lists what the report shows in bold: an index below its
    recall target, too few open-set identities. `rejection` holds the open-set rejection
    figures (`rejection.open_set_rejection`: a `rejection_holdout` fraction of the identities
    held out of the gallery, scored at the same-person `threshold` when there is one).
    """
    query_emb = np.asarray(query_emb, np.float32)
    query_labels = np.asarray(query_labels, np.int64)
    q = len(query_labels)
    if len(query_emb) != q:
        raise DataError(f"{len(query_emb)} query embeddings but {q} labels")
    ks = check_ks(ks)
    num_examples = check_num_examples(num_examples)
    exact_max_pairs = check_exact_max_pairs(exact_max_pairs)
    rejection_holdout = rejection.check_holdout(rejection_holdout)
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

    def run(exact: bool, sel=slice(None), **params):
        rows, scores = index.search(query_emb[sel], depth + extra, exact=exact, **params)
        if extra:
            rows, scores = drop_self(rows, scores, self_rows[sel], depth)
        return rows, scores

    rows, scores, search, ann = _ranking(run, index, q, ks, depth, exact_max_pairs, seed)
    retrieved = np.where(rows >= 0, index.labels[np.maximum(rows, 0)], -1)
    rel = M.relevance(retrieved, query_labels)
    per_q = M.per_query_metrics(rel, num_rel, ks)
    valid = num_rel > 0
    if names is None:
        names = names_from_paths(index.labels, index.paths)
    held_out = None
    if protocol == "open_set":
        held_out = len(np.unique(query_labels[query_labels >= 0]))

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
        held_out_identities=held_out,
        metrics=M.summarize(per_q, valid),
        chance=chance_levels(num_rel[valid], available, ks),
        map_r_truncated=int((num_rel > depth).sum()),
        ann_recall=ann,
        search=search,
        backend=index.backend,
        index_params=index.scann_params,
        index_tuning=_tuning_summary(index.tuning),
        embedder=dict(index.embedder),
        per_class=_per_class(per_q, query_labels, valid, names, num_rel, loo),
        examples=_examples(rows, scores, query_labels, valid, index, query_paths, names,
                           num_examples, seed),
    )
    result["rejection"] = rejection.open_set_rejection(
        query_emb, query_labels, index.embeddings, index.labels, names=names,
        self_rows=self_rows if loo else None, threshold=threshold,
        threshold_source=threshold_source, holdout=rejection_holdout, seed=seed)
    result["class_counts"] = counts.counts_summary(
        [(r["name"], r["queries"], r["gallery"]) for r in result["per_class"]],
        gallery="gallery (leave-one-out)" if loo else "gallery")
    result["warnings"] = _warnings(result, index)
    return result


def _per_class(per_q, query_labels, valid, names, num_rel, loo: bool) -> list[dict]:
    """M.per_class rows plus each identity's gallery images (its relevant items; for
    leave-one-out, the other images of the identity)."""
    rows = M.per_class(per_q, query_labels, valid, names)
    for row in rows:
        row["gallery"] = int(num_rel[valid & (query_labels == row["label"])].max())
    return rows


def _ranking(run, index: SearchIndex, q: int, ks: Sequence[int], depth: int,
             exact_max_pairs: int, seed: int):
    """(rows, scores, search, ann_recall): exact search when affordable, else ScaNN re-tuned
    for `depth`; ann_recall is the index's own setting against exact search."""
    pairs = q * index.size
    search = dict(pairs=int(pairs), exact_max_pairs=exact_max_pairs, depth=int(depth))
    if index.backend == "exact" or not q:
        rows, scores = run(exact=True)
        return rows, scores, dict(search, metrics_from="exact", why="exact index"), None
    if pairs <= exact_max_pairs:
        rows, scores = run(exact=True)
        served, _ = run(exact=False)
        ann = {f"recall@{k}": M.ann_recall_at_k(served, rows, k) for k in ks}
        search.update(metrics_from="exact", why="queries x gallery within eval.exact_max_pairs",
                      ann_queries=int(q))
        return rows, scores, search, ann
    # Too many pairs for exact search over every query: tune ScaNN for the depth read, and
    # measure both settings against exact search on a sample of the queries.
    sample = np.sort(np.random.default_rng(seed).choice(q, size=min(q, ANN_SAMPLE),
                                                        replace=False))
    truth, _ = run(exact=True, sel=sample)
    served, _ = run(exact=False, sel=sample)
    ann = {f"recall@{k}": M.ann_recall_at_k(served, truth, k) for k in ks}
    if index.backend == "milvus":  # the collection's own search; nothing to re-tune here
        rows, scores = run(exact=False)
        search.update(metrics_from="milvus", why="queries x gallery above eval.exact_max_pairs",
                      ann_queries=int(len(sample)))
        return rows, scores, search, ann
    target = recall_target(index)
    saved = dict(index.scann_params), index.tuning
    try:
        tuned = index.tune(target, k=depth, seed=seed)
    finally:
        index.scann_params, index.tuning = saved
    params = dict(leaves_to_search=tuned["leaves_to_search"], reorder=tuned["reorder"])
    rows, scores = run(exact=False, **params)
    deep, _ = run(exact=False, sel=sample, **params)
    search.update(metrics_from="scann", why="queries x gallery above eval.exact_max_pairs",
                  ann_queries=int(len(sample)), tuned_for=f"recall@{depth}",
                  target_recall=target, **params,
                  depth_recall=M.ann_recall_at_k(deep, truth, depth))
    return rows, scores, search, ann


def _tuning_summary(tuning) -> dict | None:
    """The index's build-time tuning without its grid (the report needs the outcome only)."""
    if not tuning:
        return None
    return {k: v for k, v in tuning.items() if k != "grid"}


def _warnings(result: Mapping[str, Any], index: SearchIndex) -> list[str]:
    """What the report and stdout show in bold: recall below target, too few identities."""
    out = []
    if index.backend == "scann":
        target = recall_target(index)
        t = index.tuning
        if t is None:
            out.append(f"the ScaNN index was never tuned: its recall was not measured when it "
                       f"was built (rebuild it with scripts/build_index.py to tune it to "
                       f"recall@k {DEFAULT_TARGET_RECALL})")
        elif not t.get("met", True):
            out.append(f"the ScaNN index serves a setting below its target: recall@{t['k']} "
                       f"{t['recall']:.4f} < {target} on its {t['num_queries']} tuning queries")
        ann = result.get("ann_recall") or {}
        k = result["ks"][-1]
        got = ann.get(f"recall@{k}")
        if got is not None and got < target:
            out.append(f"the ScaNN index's recall@{k} against exact search on these queries is "
                       f"{got:.4f}, below the target {target}: searches it serves miss "
                       f"neighbours that exact search finds")
        s = result["search"]
        if s["metrics_from"] == "scann" and s["depth_recall"] < target:
            out.append(f"the metrics come from ScaNN at recall@{s['depth']} "
                       f"{s['depth_recall']:.4f} against exact search, below the target "
                       f"{target}: they understate the embedder (raise eval.exact_max_pairs to "
                       f"score with exact search)")
    n = result.get("held_out_identities")
    if n is not None and n < MIN_OPEN_SET_IDENTITIES:
        out.append(f"only {n} held-out identities (fewer than {MIN_OPEN_SET_IDENTITIES}): "
                   f"open-set scores are close to chance (see the chance levels); hold out "
                   f"more with data.open_set_holdout (a whole number is a count)")
    return out


def chance_levels(num_rel: np.ndarray, available: int, ks: Sequence[int]) -> dict:
    """Each metric's expected value under a uniformly random ranking of the `available`
    gallery items, averaged over queries with `num_rel` (>= 1) relevant items each.

    With M items of which R relevant, the hits h in the top k are hypergeometric:
    hit@k = 1 - C(M-R, k)/C(M, k); precision@k = R/M; recall@k = k/M; F1@k = 2h/(k+R)
    per query, so 2kR/(M(k+R)); AP@R = (1/R) sum_{i<=R} P@i rel_i has expectation
    H_R/M + (R-1)(R-H_R)/(M(M-1)) (H_R the R-th harmonic number).
    """
    r = np.asarray(num_rel, np.float64)
    m = float(available)
    if not len(r) or m < 1:
        return {}
    out = {}
    for k in ks:
        kk = min(k, available)
        # P(no hit in k draws) = prod_{i<k} (M-R-i)/(M-i), 0 once M-R-i reaches 0.
        i = np.arange(kk, dtype=np.float64)
        miss = np.prod(np.clip((m - r[:, None] - i) / (m - i), 0.0, None), axis=1)
        out[f"top{k}"] = float(np.mean(1.0 - miss))
        out[f"precision@{k}"] = float(np.mean(r * kk / (m * k)))
        out[f"recall@{k}"] = kk / m
        out[f"f1@{k}"] = float(np.mean(2.0 * kk * r / (m * (k + r))))
    table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(r.max()) + 1))])
    harmonic = table[r.astype(np.int64)]
    pairs = m * (m - 1) if m > 1 else 1.0
    out["map@r"] = float(np.mean(harmonic / m + (r - 1) * (r - harmonic) / pairs))
    return out


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
             backend: str = "auto", exact_max_items: int = 200_000,
             target_recall: float | None = None, batch_size: int = 256, num_examples: int = 6,
             seed: int = 0, progress: bool = False, query_emb: np.ndarray | None = None,
             exact_max_pairs: int = EXACT_MAX_PAIRS, threshold: float | None = None,
             threshold_source: str = "", rejection_holdout: float = 0.2) -> dict:
    """Evaluates an `Embedder` on `PreparedData`-like `data` (images, paths, query, gallery).

    `data.gallery is None` means leave-one-out over `data.query`. Without `index`, one is
    built over the gallery with `backend`; a given index must hold the gallery's paths.
    `query_emb` reuses query embeddings the caller already has. `threshold`,
    `threshold_source` and `rejection_holdout` go to `evaluate_embeddings` (open-set rejection).
    """
    # Checked before any embedding work, so a bad setting fails in a second, not an hour.
    ks = check_ks(ks)
    num_examples = check_num_examples(num_examples)
    exact_max_pairs = check_exact_max_pairs(exact_max_pairs)
    rejection.check_holdout(rejection_holdout)
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
                               num_examples=num_examples, seed=seed,
                               exact_max_pairs=exact_max_pairs, threshold=threshold,
                               threshold_source=threshold_source,
                               rejection_holdout=rejection_holdout)


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
    line = (f"{setting}: {result['num_queries']} queries, gallery {result['gallery_size']}: "
            f"{tops} mAP@R={m['map@r']:.4f}")
    if result.get("held_out_identities") is not None:
        chance = result.get("chance") or {}
        line += f" ({result['held_out_identities']} held-out identities"
        if "top1" in chance:
            line += f"; chance Top-1={chance['top1']:.4f} mAP@R={chance['map@r']:.4f}"
        line += ")"
    return line
