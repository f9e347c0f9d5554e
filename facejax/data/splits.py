"""Seeded, stable (hash-based) subsets and splits: closed-set, open-set and leave-one-out.

Every decision hashes (seed, purpose, class name[, relative path]) to a uniform number in
[0, 1) and compares it with a threshold, so a file's side does not depend on which other files
exist: rerunning gives the same split and adding files never moves old ones. The one exception
is the guarantee of at least one image on each side of a class with 2+ images (and at least
one held-out identity): when a class had no file under the threshold, its lowest-hash file is
forced to the other side, and it moves back once a newly added file lands there on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

from facejax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class Subset:
    """Rows of PreparedData.images (`indices`, int64) with their labels (int32, -1 = none)."""
    indices: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "indices", np.asarray(self.indices, np.int64))
        object.__setattr__(self, "labels", np.asarray(self.labels, np.int32))

    def __len__(self) -> int:
        return len(self.indices)


@dataclasses.dataclass(frozen=True)
class Split:
    """What a protocol decided. `class_names` are the training classes (train/val labels index
    them); query/gallery labels index `identity_names`; `gallery=None` means leave-one-out."""
    protocol: str
    class_names: list[str]
    train: Subset
    val: Subset
    query: Subset
    gallery: Subset | None
    identity_names: list[str]
    excluded: list[tuple[str, str]]


def unit_hash(*parts) -> float:
    """A uniform number in [0, 1) determined only by `parts` (stable across runs/machines)."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0 ** 64


def _hashes(seed: int, purpose: str, class_names: Sequence[str], labels: np.ndarray,
            paths: Sequence[str]) -> np.ndarray:
    return np.array([unit_hash(seed, purpose, class_names[l] if l >= 0 else "", p)
                     for l, p in zip(labels, paths)], np.float64)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ConfigError(f"data.{name} must be between 0 and 1 (exclusive), got {value}")


def split_val(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str],
              val_fraction: float, seed: int) -> np.ndarray:
    """Stratified, stable train/val split: returns is_val (bool [N]).

    A file is val when its hash is below `val_fraction`; each class with 2+ files keeps at
    least one file on each side. Rows with label -1 are never val.
    """
    _check_fraction("val_fraction", val_fraction)
    labels = np.asarray(labels)
    u = _hashes(seed, "split", class_names, labels, paths)
    is_val = (u < val_fraction) & (labels >= 0)
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            is_val[rows] = False
            continue
        if not is_val[rows].any():
            is_val[rows[np.argmin(u[rows])]] = True
        if is_val[rows].all():
            is_val[rows[np.argmax(u[rows])]] = False
    return is_val


def limit_rows(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
               max_classes: int = 0, max_per_class: int = 0, max_images: int = 0,
               min_images: int = 1, seed: int = 0) -> np.ndarray:
    """Rows kept by the quick-experiment caps (0 = no cap), chosen by hash, in listing order.

    max_classes picks among classes with at least `min_images` files; max_per_class and
    max_images keep each class's / the whole set's lowest-hash files. The hash purpose differs
    from the split's, so a capped class still gets a representative val side.
    """
    labels = np.asarray(labels)
    keep = np.ones(len(labels), bool)
    counts = np.bincount(labels[labels >= 0], minlength=len(class_names))
    if max_classes and max_classes < len(class_names):
        candidates = [c for c in range(len(class_names)) if counts[c] >= max(min_images, 1)]
        ranked = sorted(candidates, key=lambda c: unit_hash(seed, "classes", class_names[c]))
        chosen = np.zeros(len(class_names), bool)
        chosen[ranked[:max_classes]] = True
        keep &= (labels >= 0) & chosen[np.maximum(labels, 0)]
    u = _hashes(seed, "subset", class_names, labels, paths)
    if max_per_class:
        for c in np.unique(labels[keep]):
            rows = np.flatnonzero(keep & (labels == c))
            if len(rows) > max_per_class:
                keep[rows[np.argsort(u[rows], kind="stable")[max_per_class:]]] = False
    if max_images and keep.sum() > max_images:
        rows = np.flatnonzero(keep)
        keep[rows[np.argsort(u[rows], kind="stable")[max_images:]]] = False
    return np.flatnonzero(keep).astype(np.int64)


def _train_val(rows: np.ndarray, paths: Sequence[str], labels: np.ndarray,
               class_names: Sequence[str], *, val_fraction: float, seed: int,
               min_images: int) -> tuple[list[str], Subset, Subset, list[tuple[str, str]]]:
    """Splits `rows` (global indices) per class; returns kept class names, train, val, excluded."""
    if min_images < 1:
        raise ConfigError(f"data.min_images_per_class must be >= 1, got {min_images}")
    labels = np.asarray(labels)
    counts = np.bincount(labels[rows], minlength=len(class_names))
    present = [c for c in range(len(class_names)) if counts[c] > 0]
    kept = [c for c in present if counts[c] >= min_images]
    excluded = [(class_names[c], f"class with < {min_images} images (min_images_per_class)")
                for c in present if counts[c] < min_images]
    excluded += [(class_names[c], "class with 1 image: train only") for c in kept if counts[c] == 1]
    if not kept:
        raise DataError(f"no class has at least min_images_per_class={min_images} images "
                        f"(largest has {counts.max() if len(counts) else 0})")
    remap = np.full(len(class_names), -1, np.int32)
    remap[kept] = np.arange(len(kept), dtype=np.int32)
    rows = rows[remap[labels[rows]] >= 0]
    is_val = split_val([paths[r] for r in rows], labels[rows], class_names, val_fraction, seed)
    new = remap[labels[rows]]
    train = Subset(rows[~is_val], new[~is_val])
    val = Subset(rows[is_val], new[is_val])
    return [class_names[c] for c in kept], train, val, excluded


def closed_set(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
               val_fraction: float, seed: int, min_images: int = 2,
               rows: np.ndarray | None = None) -> Split:
    """Per class, images split into train and val; retrieval queries val against train."""
    labels = np.asarray(labels)
    rows = np.flatnonzero(labels >= 0) if rows is None else np.asarray(rows, np.int64)
    names, train, val, excluded = _train_val(rows, paths, labels, class_names,
                                             val_fraction=val_fraction, seed=seed,
                                             min_images=min_images)
    if len(val) == 0:
        raise DataError("no class has 2 or more images, so there is nothing to validate or "
                        "query with; add images or use more classes")
    return Split("closed_set", names, train, val, val, train, names, excluded)


def open_set(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
             holdout: float, min_eval_images: int, val_fraction: float, seed: int,
             min_images: int = 2) -> Split:
    """Identity-disjoint: held-out identities are never trained on and are evaluated
    leave-one-out (gallery=None); the rest split train/val like closed-set.

    Only identities with at least `min_eval_images` (and 2) images can be held out, since
    the others could not be evaluated; each such identity is held out when its hash is below
    `holdout`.
    """
    _check_fraction("open_set_holdout", holdout)
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=len(class_names))
    need = max(min_eval_images, 2)
    eligible = counts >= need
    if not eligible.any():
        raise DataError(f"open_set needs identities with at least open_set_min_images={need} "
                        f"images to hold out; the largest has {counts.max() if len(counts) else 0}")
    u = np.array([unit_hash(seed, "identity", n) for n in class_names])
    held = eligible & (u < holdout)
    if not held.any():
        held[np.flatnonzero(eligible)[np.argmin(u[eligible])]] = True
    if not (counts[~held] > 0).any():
        if held.sum() < 2:
            raise DataError("open_set needs at least two identities (one to train, one to hold out)")
        held[np.flatnonzero(held)[np.argmax(u[held])]] = False
    row_held = (labels >= 0) & held[np.maximum(labels, 0)]
    train_rows = np.flatnonzero((labels >= 0) & ~row_held)
    names, train, val, excluded = _train_val(train_rows, paths, labels, class_names,
                                             val_fraction=val_fraction, seed=seed,
                                             min_images=min_images)
    q = np.flatnonzero(row_held)
    query = Subset(q, labels[q])
    return Split("open_set", names, train, val, query, None, list(class_names), excluded)


def check_disjoint(split: Split) -> None:
    """Raises DataError if any held-out (query) identity also appears in training."""
    train_ids = {split.class_names[l] for l in np.unique(split.train.labels)}
    query_ids = {split.identity_names[l] for l in np.unique(split.query.labels) if l >= 0}
    if split.protocol == "open_set" and train_ids & query_ids:
        raise DataError(f"open_set identities overlap: {sorted(train_ids & query_ids)[:5]}")


def eval_sets(query: Subset, gallery: Subset | None) -> tuple[Subset, Subset, bool]:
    """(queries, gallery, exclude_self): leave-one-out when `gallery` is None, i.e. every
    query searches all queries and its own hit must be dropped (see `drop_self`)."""
    if gallery is None:
        return query, query, True
    return query, gallery, False


def drop_self(neighbors: np.ndarray, query_rows: np.ndarray, gallery_rows: np.ndarray,
              k: int) -> np.ndarray:
    """Leave-one-out: removes each query's own row from its neighbour list.

    `neighbors` [Q, K'] are positions in the gallery (search K' = k + 1); returns
    [Q, min(k, K' - 1)] positions in their original order, minus the query's own row.
    """
    neighbors = np.asarray(neighbors)
    width = min(k, neighbors.shape[1] - 1)  # a row may hold its self-match last
    is_self = np.asarray(gallery_rows)[neighbors] == np.asarray(query_rows)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(neighbors, order, axis=1)[:, :width]
