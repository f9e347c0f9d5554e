"""Evaluate a run's index with its queries: Top-1/5/10, precision/recall/F1@k, mAP@R, report.

  python scripts/eval_topk.py --workdir runs/demo

Writes WORKDIR/report/ (report.md, report.json, report.html, topk_examples.png) and, for the
competition layout, WORKDIR/report/competition_topk.json.
"""

from __future__ import annotations

import argparse
import os

from facejax import cli, config, cpu_preset
from facejax.retrieval import rejection, report
from facejax.retrieval import workdir as wd
from facejax.retrieval.evaluate import result_summary


def main(argv: list[str]) -> int:
    cpu_preset.apply()  # XLA:CPU settings, before jax starts (FACEJAX_CPU_PRESET=0: off)
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run folder with an index")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(rest)
    cfg = wd.read_run_config(args.workdir)
    for item in overrides:
        config.apply_override(cfg, item)
    result = wd.evaluate_workdir(args.workdir, cfg, progress=not args.no_progress)
    report_dir = os.path.join(args.workdir, wd.REPORT_DIR)
    for line in report.warning_lines(result):
        print(report.bold(line))
    if result.get("competition_json"):
        print(f"wrote the top-k ranking of {result['num_queries_total']} queries "
              f"({result['num_queries_unlabelled']} unlabelled) to "
              f"{os.path.join(report_dir, result['competition_json'])}")
    if report.scored(result):
        print(report.setting_line(result).replace("**", ""))
        header, rows = report.metric_rows(result)
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for line in [header] + rows:
            print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    for line in (report.search_line(result), report.ann_line(result)):
        if line:
            print(line)
    if result.get("rejection"):
        print(rejection.summary_line(result["rejection"]))
        header, rows = rejection.table(result["rejection"])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for line in [header] + rows:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(line, widths)))
    # Without scored queries this says why, instead of a table of NaNs.
    print(result_summary(result))
    print(f"report: {os.path.join(report_dir, 'report.html')}")
    return 0


if __name__ == "__main__":
    cli.run(main)
