"""Embed a run's gallery with its exported embedder and save a search index in WORKDIR/index.

  python scripts/build_index.py --workdir runs/demo [--backend auto|exact|scann|milvus]
      [--target_recall 0.95] [--shard_size 16384] [--config.data.root=/moved/images]

Embedding is resumable: finished shards in WORKDIR/index_work are reused after an interruption.
Multi-host: started by a scheduler like scripts/train.py (facejax.cluster, deploy/), every
process embeds its share of the shards and process 0 builds the index.
"""

from __future__ import annotations

import argparse
import os

from facejax import cli, config, cpu_preset
from facejax.retrieval import report
from facejax.retrieval import workdir as wd
from facejax.retrieval.embed import read_embedder_meta
from facejax.retrieval.index import BACKENDS, DEFAULT_TARGET_RECALL


def describe_items(workdir: str, dim: int) -> str:
    """What one index item is: the embedder's own words (exports record them), else its size."""
    meta = read_embedder_meta(os.path.join(workdir, "embedder"))
    what = meta.get("embedding") or f"a {dim}-d embedding (exported before embedders said more)"
    return f"{meta.get('model', 'model')} embedding of one gallery image: {what}"


def main(argv: list[str]) -> int:
    cpu_preset.apply()  # XLA:CPU settings, before jax starts (FACEJAX_CPU_PRESET=0: off)
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="training run folder")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="default: the run's index.backend")
    parser.add_argument("--target_recall", type=float, default=None,
                        help="in (0, 1]: tune ScaNN to this recall@k against exact search "
                             f"(default: the run's index.target_recall, {DEFAULT_TARGET_RECALL}; "
                             "no effect with exact search, whose recall is 1)")
    parser.add_argument("--shard_size", type=int, default=wd.SHARD_SIZE,
                        help="gallery items per resumable shard (and per process's turn)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(rest)
    from facejax.cluster import initialize  # before any jax backend starts
    initialize()
    cfg = wd.read_run_config(args.workdir)
    for item in overrides:
        config.apply_override(cfg, item)
    index = wd.build_workdir_index(args.workdir, cfg, backend=args.backend,
                                   target_recall=args.target_recall,
                                   progress=not args.no_progress, shard_size=args.shard_size)
    print(f"index: {index.size} items, dim {index.dim}, backend {index.backend}"
          + (f", ScaNN {index.scann_params}" if index.scann_params else ""))
    print(f"each item: {describe_items(args.workdir, index.dim)}")
    recall = getattr(index._milvus, "recall", None)
    if recall:
        print(f"Milvus {index._milvus.index_type} index, collection {index._milvus.collection} "
              f"at {index._milvus.uri}: recall@{recall['k']}={recall['recall']:.4f} against "
              f"exact search on {recall['num_queries']} gallery queries")
    if index.tuning:
        t = index.tuning
        print(f"tuned: leaves_to_search={t['leaves_to_search']} reorder={t['reorder']} "
              f"recall@{t['k']}={t['recall']:.4f} on {t['num_queries']} gallery queries, "
              f"{t.get('recall_lower', t['recall']):.4f} less 2 standard errors "
              f"(target {t['target_recall']}, {'met' if t['met'] else 'NOT met'})")
        if not t["met"]:
            print(report.bold(
                f"WARNING: this ScaNN index serves recall@{t['k']} {t['recall']:.4f}, below "
                f"its target {t['target_recall']}: no setting tried reached it. Searches miss "
                f"neighbours that exact search finds; use --backend exact, or a lower target"))
    return 0


if __name__ == "__main__":
    cli.run(main)
