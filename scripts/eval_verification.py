"""Pair verification (LFW View-2, 10-fold) of a run's exported embedder.

  python scripts/eval_verification.py --workdir runs/lfw [--pairs lfw_pairs.txt] [--root lfw/]
      [--metric cosine|euclidean] [--config.data.face_crop="(0.21,0.075,1.07,0.937)"]

--root defaults to the run's data.root and --pairs to pairs.txt / lfw_pairs.txt in or beside
it. Writes WORKDIR/report/verification.json and verification.md.
"""

from __future__ import annotations

import argparse
import os

from facejax import cli, config, cpu_preset
from facejax.retrieval import verification, verify_run
from facejax.retrieval import workdir as wd


def main(argv: list[str]) -> int:
    cpu_preset.apply()  # XLA:CPU settings, before jax starts (FACEJAX_CPU_PRESET=0: off)
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run folder with an embedder")
    parser.add_argument("--pairs", default=None, help="pairs file (LFW View-2 format)")
    parser.add_argument("--root", default=None, help="folder holding Name/Name_0001.jpg")
    parser.add_argument("--metric", default="cosine", choices=verification.METRICS)
    parser.add_argument("--name", default="LFW", help="benchmark name in the printed line")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(rest)
    cfg = wd.read_run_config(args.workdir)
    for item in overrides:
        config.apply_override(cfg, item)
    result = verify_run.verify_workdir(args.workdir, args.pairs, args.root, config=cfg,
                                       metric=args.metric, name=args.name,
                                       progress=not args.no_progress)
    print(verification.format_result(result, args.name))
    print(f"report: {os.path.join(args.workdir, wd.REPORT_DIR, verify_run.JSON_NAME)}")
    print(f"same-person threshold {result['best_threshold_all']:.4f}: search.py and the service "
          f"mark results below it 'no match'; scripts/eval_topk.py --workdir {args.workdir} "
          f"puts these results, and how many unknown people it rejects, in the report")
    return 0


if __name__ == "__main__":
    cli.run(main)
