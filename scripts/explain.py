"""Why does a result match a query? Heatmaps over both images, written as a PNG.

  python scripts/explain.py --workdir runs/dlib --query a.jpg --result b.jpg [--out explain.png]
  python scripts/explain.py --workdir runs/dlib --query a.jpg --k 5   # its top 5 in the index
      [--method both|auto|similarity|occlusion] [--patch 25 --stride 12]

Similarity maps (exact split of the cosine over the last conv map; needs the run's checkpoint
and a model whose embedding is a pooled conv map) and occlusion sensitivity (the drop of the
cosine when a patch is greyed; any model). `both` (default) draws each the model allows.
"""

from __future__ import annotations

import argparse

from facejax import cli, config
from facejax.retrieval import workdir as wd
from facejax.retrieval.explain_run import BOTH, CHOICES, explain_workdir


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run folder (exported)")
    parser.add_argument("--query", required=True, help="the query image")
    parser.add_argument("--result", default=None, help="the matched image")
    parser.add_argument("--k", type=int, default=0, help="explain the query's top k instead")
    parser.add_argument("--method", default=BOTH, choices=CHOICES)
    parser.add_argument("--patch", type=int, default=0, help="occlusion patch, px (0: auto)")
    parser.add_argument("--stride", type=int, default=0, help="occlusion stride (0: patch/2)")
    parser.add_argument("--out", default="explain.png", help="the PNG to write")
    args = parser.parse_args(rest)
    cfg = wd.read_run_config(args.workdir)
    for item in overrides:
        config.apply_override(cfg, item)
    res = explain_workdir(args.workdir, args.query, result=args.result, k=args.k,
                          out_png=args.out, method=args.method, patch=args.patch,
                          stride=args.stride, config=cfg)
    for i, s in enumerate(res["scores"], 1):
        print(f"pair {i}: cosine {s:.4f}")
    if res["note"]:
        print(f"note: {res['note']}")
    print(f"{', '.join(res['methods'])} maps: {res['out']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
