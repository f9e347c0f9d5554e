"""Search a run's index with a query image (or a folder of them): top-k gallery images.

  python scripts/search.py --workdir runs/demo --query face.jpg [--k 10] [--json] [--out grid.png]
      [--threshold auto|none|0.91] [--config.data.max_pixels=100000000]

Query images larger than the run's data.max_pixels are refused, as in training. `--out` may
name a folder: the grid is then written there as search.png; a name without .png gets it.

`--threshold` (default `auto`: the same-person threshold scripts/eval_verification.py calibrated
for this run, if it has one) marks the results below it "no match": a person who is not in the
gallery still gets nearest neighbours, and this says they are not the same person.
"""

from __future__ import annotations

import argparse
import json
import os

from facejax import cli, config, cpu_preset
from facejax.errors import ConfigError
from facejax.retrieval import workdir as wd
from facejax.retrieval.verify_run import match_threshold

DEFAULT_GRID = "search.png"


# Other picture formats: the grid is always written as PNG, so such a name would mislead.
OTHER_FORMATS = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".svg", ".pdf")


def grid_path(out: str) -> str:
    """`--out` as a PNG path: a folder (existing, or ending in a slash) gets search.png; a
    name without .png gets it appended; another picture format's extension is refused."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, DEFAULT_GRID)
    ext = os.path.splitext(out)[1].lower()
    if ext in OTHER_FORMATS:
        raise ConfigError(f"--out {out}: the grid is written as a PNG; name it "
                          f"{os.path.splitext(out)[0]}.png")
    return out if ext == ".png" else out + ".png"


def parse_threshold(value: str, workdir: str) -> float | None:
    if value == "none":
        return None
    if value == "auto":
        return match_threshold(workdir)[0]
    try:
        t = float(value)
    except ValueError:
        t = float("nan")
    if not -1.0 <= t <= 1.0:
        raise ConfigError(f"--threshold must be auto, none or a cosine in [-1, 1], got {value!r}")
    return t


def main(argv: list[str]) -> int:
    cpu_preset.apply()  # XLA:CPU settings, before jax starts (FACEJAX_CPU_PRESET=0: off)
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run folder with an index")
    parser.add_argument("--query", required=True, help="an image file or a folder of images")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--threshold", default="auto",
                        help="'no match' cosine threshold: auto (the run's open-set one from "
                             "eval_topk.py, else its pair threshold from eval_verification.py, "
                             "if any), none, or a number")
    parser.add_argument("--out", default=None,
                        help=f"write a PNG grid of queries and results (a folder: {DEFAULT_GRID})")
    args = parser.parse_args(rest)
    cfg = wd.read_run_config(args.workdir)
    for item in overrides:
        config.apply_override(cfg, item)
    out = grid_path(args.out) if args.out else None
    result = wd.search_workdir(args.workdir, args.query, args.k, grid_png=out, config=cfg,
                               threshold=parse_threshold(args.threshold, args.workdir))
    print(json.dumps(result, indent=1) if args.json else wd.format_search_table(result))
    if out and not args.json:
        print(f"grid: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
