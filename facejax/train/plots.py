"""Per-epoch training curves as PNGs (the paper's loss and accuracy figures), redrawn each epoch.

The accuracy figure holds two kinds of line, named as such in its legend and title: the
classifier's accuracy (the training head's softmax over the training classes; low with many
classes or a cosine head, and not what retrieval uses) and retrieval Top-k (nearest-neighbour
search of validation images among training images, what the report scores). Epoch 0, when
recorded, is the starting model. Epochs are whole numbers on the x axis.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from facejax.atomic import atomic_path
from facejax.train.checkpoint import VAL_KS

CURVES = {
    "loss.png": ("Loss", "classifier loss (cross-entropy of the training head)",
                 (("train_loss", "train loss"), ("val_loss", "validation loss"))),
    "accuracy.png": ("Accuracy / Top-k",
                     "classifier accuracy (softmax head) vs retrieval Top-k (nearest neighbour)",
                     (("train_accuracy", "train classifier accuracy"),
                      ("val_accuracy", "validation classifier accuracy"),
                      *((f"val_top{k}", f"validation retrieval Top-{k}") for k in VAL_KS))),
}


def draw_curves(history: Sequence[dict], ylabel: str, what: str,
                series: Sequence[tuple[str, str]], title: str = ""):
    """One figure of `series` ((record key, legend label), ...) against whole epochs."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    epochs = []
    for key, label in series:
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if points:
            xs, ys = zip(*points)
            epochs += xs
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("epoch (0 = the starting model)" if 0 in epochs else "epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if epochs:
        lo, hi = min(epochs), max(epochs)
        pad = max(0.5, 0.05 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_title(f"{title}\n{what}" if title else what, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, ax


def plot_history(history: Sequence[dict], out_dir: str, title: str = "") -> list[str]:
    """Writes loss.png and accuracy.png from per-epoch records; returns the paths written.

    Each file is written beside itself and renamed, so a viewer never sees half a PNG.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, (ylabel, what, series) in CURVES.items():
        fig, _ = draw_curves(history, ylabel, what, series, title)
        path = os.path.join(out_dir, name)
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp)
        plt.close(fig)
        written.append(path)
    return written
