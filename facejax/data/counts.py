"""Per-identity query and gallery counts of a split, and their compact summary in words."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Up to this many identities, the summary lists every identity's counts, not only min/median/max.
LIST_MAX_IDENTITIES = 30


def identity_counts(query_labels: np.ndarray, gallery_labels: np.ndarray | None,
                    names: Sequence[str]) -> list[tuple[str, int, int]]:
    """(name, queries, gallery images) of each identity with a labelled query, by label.

    `gallery_labels=None` is leave-one-out over the queries: a query's gallery is the other
    images of its identity.
    """
    q = np.asarray(query_labels)
    q = q[q >= 0]
    if not len(q):
        return []
    size = max(int(q.max()) + 1, len(names))
    nq = np.bincount(q, minlength=size)
    if gallery_labels is None:
        ng = np.maximum(nq - 1, 0)
    else:
        g = np.asarray(gallery_labels)
        g = g[(g >= 0) & (g < size)]
        ng = np.bincount(g, minlength=size)
    return [(names[c] if c < len(names) else str(c), int(nq[c]), int(ng[c]))
            for c in np.flatnonzero(nq)]


def spread(values: Sequence[int]) -> dict:
    """{min, median, max} of whole counts (the median may be a half)."""
    v = np.asarray(values, np.float64)
    med = float(np.median(v))
    return dict(min=int(v.min()), median=int(med) if med.is_integer() else med, max=int(v.max()))


def counts_summary(counts: Sequence[tuple[str, int, int]], *, gallery: str = "gallery") -> dict:
    """The JSON-ready summary: identities, queries/gallery spread, and (for at most
    LIST_MAX_IDENTITIES identities) every identity's counts."""
    if not counts:
        return dict(identities=0)
    out = dict(identities=len(counts), queries=spread([c[1] for c in counts]),
               gallery=spread([c[2] for c in counts]), gallery_is=gallery)
    if len(counts) <= LIST_MAX_IDENTITIES:
        out["per_identity"] = [dict(name=n, queries=q, gallery=g) for n, q, g in counts]
    return out


def summary_lines(summary: dict) -> list[str]:
    """The summary in words, e.g. 'per identity (40): queries 2 / 2 / 3 (min / median / max),
    gallery 6 / 6 / 8', then one line per identity for small sets."""
    if not summary.get("identities"):
        return []
    q, g = summary["queries"], summary["gallery"]
    lines = [f"per identity ({summary['identities']}): queries {q['min']} / {q['median']} / "
             f"{q['max']}, {summary.get('gallery_is', 'gallery')} {g['min']} / {g['median']} / "
             f"{g['max']} (min / median / max)"]
    for row in summary.get("per_identity") or []:
        lines.append(f"  {row['name']}: {row['queries']} queries, {row['gallery']} gallery")
    return lines
