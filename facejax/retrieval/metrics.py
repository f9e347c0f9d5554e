"""Retrieval metrics in NumPy: hit@k (the paper's Top-k), precision/recall/F1@k, mAP@R, ANN recall.

Per-query functions take `rel`, a bool matrix [Q, K] that is True where the j-th result of
query i shares its label, and `num_rel` [Q], the number of gallery items that do (for
leave-one-out, not counting the query itself). They return one float per query; the
summaries average over queries that have at least one relevant item.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def relevance(retrieved_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """True where a result has the query's label; label -1 (unlabelled/missing) never matches."""
    retrieved_labels = np.asarray(retrieved_labels)
    q = np.asarray(query_labels)[:, None]
    return (retrieved_labels == q) & (q >= 0) & (retrieved_labels >= 0)


def count_relevant(query_labels: np.ndarray, gallery_labels: np.ndarray,
                   leave_one_out: bool = False) -> np.ndarray:
    """Gallery items sharing each query's label; minus one for leave-one-out (the query itself)."""
    query_labels = np.asarray(query_labels, np.int64)
    gallery_labels = np.asarray(gallery_labels, np.int64)
    size = max(1, int(max(query_labels.max(initial=-1), gallery_labels.max(initial=-1))) + 1)
    counts = np.bincount(gallery_labels[gallery_labels >= 0], minlength=size)
    out = np.where(query_labels >= 0, counts[np.maximum(query_labels, 0)], 0)
    if leave_one_out:
        out = np.maximum(out - (query_labels >= 0), 0)
    return out.astype(np.int64)


def _check_k(rel: np.ndarray, k: int) -> None:
    if not 1 <= k <= rel.shape[1]:
        raise ValueError(f"k={k} but only {rel.shape[1]} results per query were retrieved")


def hit_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """1 if any of the top-k is relevant (the paper's Top-k accuracy), per query."""
    _check_k(rel, k)
    return rel[:, :k].any(axis=1).astype(np.float64)


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """Relevant results among the top-k, divided by k."""
    _check_k(rel, k)
    return rel[:, :k].sum(axis=1) / k


def recall_at_k(rel: np.ndarray, num_rel: np.ndarray, k: int) -> np.ndarray:
    """Relevant results among the top-k, divided by all relevant items (NaN when there are none)."""
    _check_k(rel, k)
    num_rel = np.asarray(num_rel, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_rel > 0, rel[:, :k].sum(axis=1) / num_rel, np.nan)


def f1_at_k(rel: np.ndarray, num_rel: np.ndarray, k: int) -> np.ndarray:
    """Per-query harmonic mean of precision@k and recall@k (0 when both are 0)."""
    p, r = precision_at_k(rel, k), recall_at_k(rel, num_rel, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return np.where(np.isnan(r), np.nan, f)


def average_precision_at_r(rel: np.ndarray, num_rel: np.ndarray) -> np.ndarray:
    """AP@R with R = the query's relevant count: (1/R) * sum_{i<=R} precision@i * rel_i.

    Results past the retrieved K count as misses, so retrieve at least max(R) for the exact value.
    """
    num_rel = np.asarray(num_rel, np.int64)
    _q, kk = rel.shape
    ranks = np.arange(1, kk + 1)
    prec = np.cumsum(rel, axis=1) / ranks
    within = ranks[None, :] <= num_rel[:, None]
    total = (prec * rel * within).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_rel > 0, total / num_rel, np.nan)


def ann_recall_per_query(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int
                         ) -> np.ndarray:
    """Per query: the fraction of the exact top-k that the approximate top-k also returned."""
    a, e = np.asarray(approx_rows)[:, :k], np.asarray(exact_rows)[:, :k]
    return np.array([len(np.intersect1d(ai[ai >= 0], ei)) / k for ai, ei in zip(a, e)],
                    np.float64)


def ann_recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k that the approximate top-k also returned."""
    per_query = ann_recall_per_query(approx_rows, exact_rows, k)
    return float(per_query.mean()) if len(per_query) else float("nan")


def per_query_metrics(rel: np.ndarray, num_rel: np.ndarray, ks: Sequence[int]) -> dict:
    """Every metric per query, keyed 'top{k}', 'precision@{k}', 'recall@{k}', 'f1@{k}', 'map@r'."""
    out = {}
    for k in ks:
        out[f"top{k}"] = hit_at_k(rel, k)
        out[f"precision@{k}"] = precision_at_k(rel, k)
        out[f"recall@{k}"] = recall_at_k(rel, num_rel, k)
        out[f"f1@{k}"] = f1_at_k(rel, num_rel, k)
    out["map@r"] = average_precision_at_r(rel, num_rel)
    return out


def summarize(per_query: dict, valid: np.ndarray) -> dict:
    """Means over the `valid` queries; NaN when there are none."""
    return {name: float(np.mean(v[valid])) if valid.any() else float("nan")
            for name, v in per_query.items()}


def per_class(per_query: dict, query_labels: np.ndarray, valid: np.ndarray,
              names: dict[int, str] | None = None) -> list[dict]:
    """Metric means per query label, sorted by label."""
    query_labels = np.asarray(query_labels)
    rows = []
    for label in np.unique(query_labels[valid]):
        sel = valid & (query_labels == label)
        row = dict(label=int(label), name=(names or {}).get(int(label), str(int(label))),
                   queries=int(sel.sum()))
        row.update({k: float(np.mean(v[sel])) for k, v in per_query.items()})
        rows.append(row)
    return rows
