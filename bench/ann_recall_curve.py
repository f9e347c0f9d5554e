"""Recall@10 of ScaNN build variants over leaves_to_search x reorder: no timing, so it is valid
on a busy machine (item 4 of issue 15: why a recall costs what it costs on real embeddings).

    .venv/bin/python bench/ann_recall_curve.py --embeddings bench/out/lfw_dlib.npy \
        --n 1000000 --variants base,dims2,soar

Variants are bench/scann_options.py's. Rows: leaves searched; columns: the reorder depth. A row
that stops rising with the reorder is bounded by the leaves (neighbours in leaves not searched);
a column that stops rising with the leaves is bounded by the AH scores (the reorder is too short).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ann import clustered, from_embeddings  # noqa: E402
from bench.scann_options import VARIANTS, build  # noqa: E402
from facejax.retrieval.index import ExactSearcher  # noqa: E402
from facejax.retrieval.metrics import ann_recall_at_k  # noqa: E402

K = 10


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--embeddings", default="")
    ap.add_argument("--variants", default="base,dims2,soar")
    ap.add_argument("--leaves", default="1,2,3,5,8,12,20")
    ap.add_argument("--reorders", default="10,20,40,60,100,200")
    args = ap.parse_args(argv)
    if args.embeddings:
        x, q = from_embeddings(args.embeddings, args.n, args.queries)
    else:
        x, q = clustered(args.n, 128, args.queries)
    truth = ExactSearcher(x).search(q, K)[0]
    reorders = [int(r) for r in args.reorders.split(",")]
    for name in args.variants.split(","):
        tree, ah, *other = VARIANTS[name]
        searcher, build_s, num_leaves = build(x, tree, ah, other[0] if other else None)
        print(f"\n{name}: {num_leaves} leaves, build {build_s:.1f} s\n")
        print("| leaves | " + " | ".join(f"R={r}" for r in reorders) + " |")
        print("|---:|" + "---:|" * len(reorders))
        for leaves in (int(v) for v in args.leaves.split(",")):
            cells = []
            for r in reorders:
                rows = searcher.search_batched_parallel(
                    q, final_num_neighbors=K, pre_reorder_num_neighbors=r,
                    leaves_to_search=leaves)[0]
                cells.append(f"{ann_recall_at_k(np.asarray(rows, np.int64), truth, K):.4f}")
            print(f"| {leaves} | " + " | ".join(cells) + " |", flush=True)
        del searcher
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
