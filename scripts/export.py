"""Export a run's best checkpoint as a jax.export embedder (uint8 images in, embeddings out).

  python scripts/export.py --workdir runs/demo [--which best|latest]
      [--compute_dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse

from facejax import cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run folder")
    parser.add_argument("--which", default="best", choices=("best", "latest"),
                        help="checkpoint to export (default: best by the monitored metric)")
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: faster on GPUs/TPUs (same parameters, embeddings within "
                             "bf16 rounding of float32's); slower on CPUs")
    args = parser.parse_args(argv)
    from facejax.train.export import export_workdir

    out = export_workdir(args.workdir, which=args.which, compute_dtype=args.compute_dtype)
    print(f"embedder written to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
