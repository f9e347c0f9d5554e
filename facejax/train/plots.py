"""Per-epoch training curves as PNGs (the seed's loss and accuracy figures), redrawn each epoch."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from facejax.atomic import atomic_path

CURVES = {
    "loss.png": ("Loss", (("train_loss", "train"), ("val_loss", "validation"))),
    "accuracy.png": ("Accuracy", (("train_accuracy", "train"), ("val_accuracy", "validation"),
                                  ("val_top1", "val retrieval top-1"),
                                  ("val_top5", "val retrieval top-5"))),
}


def plot_history(history: Sequence[dict], out_dir: str, title: str = "") -> list[str]:
    """Writes loss.png and accuracy.png from per-epoch records; returns the paths written.

    Each file is written beside itself and renamed, so a viewer never sees half a PNG.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (ylabel, series) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        path = os.path.join(out_dir, name)
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp)
        plt.close(fig)
        written.append(path)
    return written
