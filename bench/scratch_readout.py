"""The scratch CNN's retrieval read-outs compared on one trained run: Flatten vs grid averages.

  python scripts/train.py --config configs/scratch_cnn.py --workdir /tmp/att_run \
      --config.data.root=/path/to/att --config.data.image_size=64 --config.model.input_size=64 \
      --config.train.batch_size=32 --config.train.epochs=10 \
      --config.train.early_stopping_patience=0 --config.train.monitor=val_accuracy
  python bench/scratch_readout.py --workdir /tmp/att_run

The run's best checkpoint embeds its queries and gallery once; the Flatten (Table 1's layer,
what the classifier reads) is then read out as is, averaged over each cell of a 2x2 / 3x3 grid
on the last block's positions, and averaged over all of them (1x1, `avg`). Prints Top-1/5 and
mAP@R of exact search for each (the default `embedding_pool=avg2x2` is the 2x2 row).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from facejax import cli  # noqa: E402


def grid_pool(flat: np.ndarray, side: int, cells: int) -> np.ndarray:
    """[N, side*side*C] Flatten -> [N, cells*cells*C] unit-norm grid averages (0 = as is)."""
    if not cells:
        return flat / np.linalg.norm(flat, axis=1, keepdims=True)
    x = flat.reshape(len(flat), side, side, -1)
    edges = [round(i * side / cells) for i in range(cells + 1)]
    parts = [x[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(axis=(1, 2))
             for i in range(cells) for j in range(cells)]
    p = np.concatenate(parts, axis=1)
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a trained scratch_cnn run folder")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from facejax.data.augment import preprocess_eval
    from facejax.data.prepare import prepare_data
    from facejax.retrieval.metrics import (average_precision_at_r, count_relevant, hit_at_k,
                                           relevance)
    from facejax.train.checkpoint import restore_model
    from facejax.train.state import resolve_input

    model, cfg = restore_model(args.workdir)
    size, norm = resolve_input(cfg)
    data = prepare_data(cfg.data)
    features = jax.jit(lambda x: model.features(preprocess_eval(x, size, norm)))

    def embed(subset):
        order = np.argsort(subset.indices)
        rows = subset.indices[order]
        out = [np.asarray(features(jnp.asarray(np.asarray(data.images[rows[i:i + 64]]))))
               for i in range(0, len(rows), 64)]
        return np.concatenate(out), subset.labels[order]

    (qf, ql), (gf, gl) = embed(data.query), embed(data.gallery)
    side = model.backbone.side
    num_rel = count_relevant(ql, gl)
    for name, cells in (("flatten", 0), ("avg3x3", 3), ("avg2x2", 2), ("avg", 1)):
        q, g = grid_pool(qf, side, cells), grid_pool(gf, side, cells)
        rel = relevance(gl[np.argsort(-(q @ g.T), axis=1)], ql)
        print(f"{name:8s} {q.shape[1]:6d}-d  Top-1 {hit_at_k(rel, 1).mean():.4f}  "
              f"Top-5 {hit_at_k(rel, 5).mean():.4f}  "
              f"mAP@R {np.nanmean(average_precision_at_r(rel, num_rel)):.4f}")
    print(f"({len(ql)} queries, gallery of {len(gl)}, last block {side}x{side})")
    return 0


if __name__ == "__main__":
    cli.run(main)
