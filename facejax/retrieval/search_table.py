"""The text table `scripts/search.py` prints for a `search_workdir` result."""

from __future__ import annotations


def format_search_table(result: dict) -> str:
    lines = []
    t = result.get("threshold")
    if t is not None:
        lines.append(f"same-person threshold {t:.4f}: results below it are marked 'no match'")
    for q in result["queries"]:
        lines.append(f"query: {q['query']}")
        lines.append(f"  {'rank':>4}  {'score':>7}  {'identity':<28} path")
        for r in q["results"]:
            mark = "  (no match)" if r.get("match") is False else ""
            lines.append(f"  {r['rank']:>4}  {r['score']:7.4f}  {r['name'][:28]:<28} "
                         f"{r['path']}{mark}")
    for s in result["skipped"]:
        lines.append(f"skipped {s['path']}: {s['reason']}")
    return "\n".join(lines)
