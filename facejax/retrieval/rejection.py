"""Open-set rejection: does a same-person threshold say "not in the gallery" for unknown people?

Some identities are held out of the gallery (chosen by a seeded hash of their names). Their
queries are unknown people: a threshold rejects one correctly when even its best gallery score
is below it. Every other query is a known person: below the threshold it is falsely rejected;
at or above it, it is identified when its best result is its own identity. The figures are
given at the run's calibrated threshold (pair verification, report/verification.json) and at
the thresholds that accept 10%, 5% and 1% of unknown people (the false-accept / false-reject
trade-off). Scores are exact cosines (the embeddings are L2-normalised), whatever the index.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from facejax.data.splits import unit_hash
from facejax.errors import ConfigError

# Unknown-people acceptance rates (false accepts) that the trade-off rows are set to.
FALSE_ACCEPT_TARGETS = (0.10, 0.05, 0.01)
# The figures score a seeded sample of at most MAX_QUERIES queries, fewer on a large gallery
# (queries x gallery <= MAX_PAIRS, ~7 s at the ~3e8 pairs/s of exact search on 2 CPU cores),
# and never fewer than MIN_QUERIES.
MAX_QUERIES, MIN_QUERIES, MAX_PAIRS = 20_000, 1_000, 2_000_000_000
_SCORES_PER_CHUNK = 32_000_000  # query x gallery scores held at once (128 MB)


def check_holdout(value) -> float:
    """`eval.rejection_holdout` as a fraction in [0, 1) (0 = no rejection figures)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ConfigError(f"eval.rejection_holdout must be a fraction in [0, 1) of the "
                          f"identities held out of the gallery (0 = off), got {value!r}")
    return float(value)


def held_out(names: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """bool [len(names)]: identities whose hash is below `fraction`; at least one, and at
    least one left (when there are 2+)."""
    u = np.array([unit_hash(seed, "rejection", n) for n in names])
    held = u < fraction
    if len(names) >= 2:
        if not held.any():
            held[np.argmin(u)] = True
        if held.all():
            held[np.argmax(u)] = False
    return held


def _best(query_emb, gallery_emb, allowed, self_rows):
    """Best allowed gallery row and score of each query (self row excluded)."""
    best_row = np.full(len(query_emb), -1, np.int64)
    best_score = np.full(len(query_emb), -np.inf, np.float32)
    g = np.asarray(gallery_emb, np.float32)
    chunk = max(1, _SCORES_PER_CHUNK // max(len(g), 1))
    for start in range(0, len(query_emb), chunk):
        s = np.asarray(query_emb[start:start + chunk], np.float32) @ g.T
        s[:, ~allowed] = -np.inf
        own = self_rows[start:start + chunk]
        rows = np.flatnonzero(own >= 0)
        s[rows, own[rows]] = -np.inf
        best_row[start:start + len(s)] = np.argmax(s, axis=1)
        best_score[start:start + len(s)] = s[np.arange(len(s)), best_row[start:start + len(s)]]
    return best_row, best_score


def _rates(t: float, unknown: np.ndarray, known: np.ndarray, right: np.ndarray) -> dict:
    accept_u = float(np.mean(unknown >= t))
    return dict(threshold=float(t), rejection=1.0 - accept_u, false_accept=accept_u,
                false_reject=float(np.mean(known < t)),
                identification=float(np.mean((known >= t) & right)))


def open_set_rejection(query_emb: np.ndarray, query_labels: np.ndarray,
                       gallery_emb: np.ndarray, gallery_labels: np.ndarray, *,
                       names: Mapping[int, str] | None = None,
                       self_rows: np.ndarray | None = None, threshold: float | None = None,
                       threshold_source: str = "", holdout: float = 0.2, seed: int = 0,
                       max_queries: int = MAX_QUERIES) -> dict | None:
    """The rejection figures (see the module docstring), JSON-ready; None when they cannot be
    measured: `holdout` 0, or fewer than 2 identities with labelled queries and gallery images.

    `self_rows[i]` is the gallery row of query i itself (leave-one-out), -1 if none.
    """
    holdout = check_holdout(holdout)
    q_labels = np.asarray(query_labels, np.int64)
    g_labels = np.asarray(gallery_labels, np.int64)
    self_rows = (np.full(len(q_labels), -1, np.int64) if self_rows is None
                 else np.asarray(self_rows, np.int64))
    in_gallery = np.bincount(g_labels[g_labels >= 0],
                             minlength=int(q_labels.max(initial=0)) + 1)
    ids = np.unique(q_labels[(q_labels >= 0) & (q_labels < len(in_gallery))])
    ids = ids[in_gallery[ids] > 0]
    if not holdout or len(ids) < 2:
        return None
    names = names or {}
    held = ids[held_out([names.get(int(i), str(int(i))) for i in ids], holdout, seed)]
    is_held = np.isin(q_labels, held)
    allowed = (g_labels >= 0) & ~np.isin(g_labels, held)
    # Known queries need an image of their identity left besides themselves.
    own = np.where(q_labels >= 0, in_gallery[np.clip(q_labels, 0, len(in_gallery) - 1)], 0) \
        - (self_rows >= 0)
    known = np.isin(q_labels, ids) & ~is_held & (own > 0)
    use = np.flatnonzero(is_held | known)
    max_queries = min(max_queries, max(MIN_QUERIES, MAX_PAIRS // max(len(g_labels), 1)))
    if len(use) > max_queries:
        use = np.sort(np.random.default_rng(seed).choice(use, max_queries, replace=False))
    row, score = _best(np.asarray(query_emb)[use], gallery_emb, allowed, self_rows[use])
    unknown_s = score[is_held[use]]
    known_sel = known[use]
    known_s = score[known_sel]
    right = g_labels[row[known_sel]] == q_labels[use][known_sel]
    if not len(unknown_s) or not len(known_s):
        return None
    tradeoff = []
    for far in FALSE_ACCEPT_TARGETS:
        # The smallest threshold that accepts at most `far` of the unknown people.
        t = float(np.quantile(unknown_s, 1.0 - far, method="higher")) + 1e-6
        tradeoff.append(dict(_rates(t, unknown_s, known_s, right), target_false_accept=far))
    return dict(
        held_out_identities=int(len(held)), known_identities=int(len(ids) - len(held)),
        unknown_queries=int(len(unknown_s)), known_queries=int(len(known_s)),
        sampled=bool(len(use) < int((is_held | known).sum())), holdout=holdout,
        threshold=threshold, threshold_source=threshold_source,
        at_threshold=None if threshold is None else _rates(threshold, unknown_s, known_s, right),
        tradeoff=tradeoff)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_line(r: Mapping | None) -> str:
    """One line for stdout and the report: the rejection rate at the calibrated threshold."""
    if not r:
        return ""
    setting = (f"{r['held_out_identities']} identities held out of the gallery "
               f"({r['unknown_queries']} unknown-person queries, {r['known_queries']} known"
               f"{', a seeded sample' if r.get('sampled') else ''})")
    a = r.get("at_threshold")
    if a is None:
        return (f"Open-set rejection: {setting}; no calibrated same-person threshold (run "
                f"scripts/eval_verification.py, then eval_topk.py again); trade-off below.")
    return (f"Open-set rejection at the calibrated threshold {a['threshold']:.4f} "
            f"({r.get('threshold_source') or 'given'}): {_pct(a['rejection'])} of unknown "
            f"people correctly rejected ({_pct(a['false_accept'])} falsely accepted); known "
            f"people: {_pct(a['false_reject'])} falsely rejected, {_pct(a['identification'])} "
            f"accepted and identified correctly; {setting}.")


def table(r: Mapping) -> tuple[list[str], list[list[str]]]:
    """The false-accept / false-reject trade-off rows (the calibrated threshold first)."""
    header = ["threshold", "set by", "unknown rejected", "false accept", "known falsely rejected",
              "known identified"]
    rows = []
    if r.get("at_threshold"):
        rows.append(("calibrated", r["at_threshold"]))
    rows += [(f"false accept {_pct(x['target_false_accept'])}", x) for x in r["tradeoff"]]
    return header, [[f"{x['threshold']:.4f}", by, _pct(x["rejection"]), _pct(x["false_accept"]),
                     _pct(x["false_reject"]), _pct(x["identification"])] for by, x in rows]
