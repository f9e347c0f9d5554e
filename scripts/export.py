"""Export a run's best checkpoint as a jax.export embedder (uint8 images in, embeddings out).

  python scripts/export.py --workdir runs/demo [--which best|latest]
"""

from __future__ import annotations

import argparse

from facejax import cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run folder")
    parser.add_argument("--which", default="best", choices=("best", "latest"),
                        help="checkpoint to export (default: best by the monitored metric)")
    args = parser.parse_args(argv)
    from facejax.train.export import export_workdir

    out = export_workdir(args.workdir, which=args.which)
    print(f"embedder written to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
