"""Compare evaluated runs in one table (the paper's Table 3): models as rows, Top-1/5/10 + more.

  python scripts/compare_runs.py runs/resnet50 runs/vgg16 runs/scratch --out comparison.md

Each run needs WORKDIR/report/report.json (scripts/eval_topk.py writes it).
"""

from __future__ import annotations

import argparse

from facejax import cli
from facejax.atomic import write_file_atomic
from facejax.retrieval import workdir as wd


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="evaluated run folders")
    parser.add_argument("--out", default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    table = wd.compare_workdirs(args.workdirs)
    print(table)
    if args.out:
        write_file_atomic(args.out, table.encode())
    return 0


if __name__ == "__main__":
    cli.run(main)
