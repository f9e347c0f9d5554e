"""`compare_workdirs`: Table 3 over runs, from each run's `report/report.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from facejax.errors import DataError
from facejax.retrieval import report
from facejax.rundir import REPORT_DIR

# The report.json fields compare_workdirs reads.
_REPORT_KEYS = ("ks", "metrics", "protocol", "num_queries", "gallery_size")


def compare_workdirs(workdirs: Sequence[str]) -> str:
    """Table 3 over runs: reads each `workdir/report/report.json` (run eval_topk first)."""
    runs = []
    for w in workdirs:
        path = os.path.join(w, REPORT_DIR, "report.json")
        try:
            with open(path) as f:
                res = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path} is missing: run scripts/eval_topk.py --workdir {w}") \
                from None
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from e
        _check_report(res, path, w)
        name = (res.get("run") or {}).get("model") or (res.get("embedder") or {}).get("model")
        runs.append((f"{name} ({os.path.basename(os.path.normpath(w))})", res))
    return report.compare_table(runs)


def _check_report(res, path: str, workdir: str) -> None:
    """DataError naming `path` unless it holds the report fields the comparison reads."""
    again = f"run scripts/eval_topk.py --workdir {workdir} again"
    if not isinstance(res, dict):
        raise DataError(f"{path} is not a report (a JSON object expected): {again}")
    missing = [key for key in _REPORT_KEYS if key not in res]
    if missing:
        raise DataError(f"{path} is incomplete (no {', '.join(missing)}): {again}")
    ks, metrics = res["ks"], res["metrics"]
    if (not isinstance(ks, list) or not ks
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks)):
        raise DataError(f"{path}: 'ks' must be a non-empty list of whole numbers >= 1, "
                        f"got {ks!r}: {again}")
    # A metric may be null (NaN when no query could be scored), never text or a list.
    if not isinstance(metrics, dict) or not all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
            for v in metrics.values()):
        raise DataError(f"{path}: 'metrics' must map names to numbers: {again}")
    for key in ("num_queries", "gallery_size"):
        if not isinstance(res[key], int) or isinstance(res[key], bool):
            raise DataError(f"{path}: {key!r} must be a whole number, got {res[key]!r}: {again}")
