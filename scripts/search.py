"""Search a run's index with a query image (or a folder of them): top-k gallery images.

  python scripts/search.py --workdir runs/demo --query face.jpg [--k 10] [--json] [--out grid.png]
"""

from __future__ import annotations

import argparse
import json

from facejax import cli
from facejax.retrieval import workdir as wd


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run folder with an index")
    parser.add_argument("--query", required=True, help="an image file or a folder of images")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--out", default=None, help="write a PNG grid of queries and results")
    args = parser.parse_args(argv)
    result = wd.search_workdir(args.workdir, args.query, args.k, grid_png=args.out)
    print(json.dumps(result, indent=1) if args.json else wd.format_search_table(result))
    return 0


if __name__ == "__main__":
    cli.run(main)
