"""Seeded, stable (hash-based) subsets and splits for the closed-set and open-set protocols.

Every decision hashes (seed, purpose, class name[, relative path]) to a uniform number in
[0, 1) and compares it with a threshold, so a file's side does not depend on which other files
exist: rerunning gives the same split and adding files never moves old ones.

The train/val/test split ranks each class's files by hash: val takes those under
`val_fraction`, test those at or above `1 - test_fraction`, train the rest (so val does not
depend on test_fraction, and test_fraction=0 is the plain train/val split). A class of fewer
than EXACT_COUNTS_BELOW images is split by exact counts instead: the round(val_fraction * n)
lowest-hash files are val and the round(test_fraction * n) highest-hash files test, since on
10 images hash thresholds can give 6 test files to one class and 1 to the next. Larger classes
keep the thresholds (their counts are already close to the fractions, and their files never
move when others are added). Small classes then get minimum counts, in priority order:
train >= 1 always; then test >= 1 and val >= 1 (when their fraction is > 0), each only by
taking a file from a side that has 2 or more. Hence a 1-image class is train only, a 2-image
class is one train image plus one test image (with exact counts; by hash thresholds, val *or*
test), and a class with 3+ images fills every side. A forced fill keeps the hash ranking (val
lowest, test highest). The exceptions to stability are small classes: adding files to a class
of fewer than EXACT_COUNTS_BELOW images (or one whose sides were not all filled by hash) can
move a file at a boundary between sides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
from collections.abc import Sequence

import numpy as np

from facejax.errors import ConfigError, DataError

# Side codes of `split_sides`.
NONE, TRAIN, VAL, TEST = -1, 0, 1, 2
MIN_TRAIN_CLASSES = 2  # a softmax over one class learns nothing
# Open-set figures over fewer held-out identities than this are flagged: on a 24-identity set
# a 0.2 holdout kept 2, where a random ranking already gets Top-1 about 0.5.
MIN_OPEN_SET_IDENTITIES = 10
# Classes with fewer images than this are split by exact per-class counts (see the module
# docstring; data.exact_counts_below): at this size hash thresholds give test counts of about
# 0.2 * n +- 11 (2 sigma). It is below the ~1,200 images per class of the demo
# (configs/demo.py), whose split is the same as before exact counts existed.
EXACT_COUNTS_BELOW = 200


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
    """A uniform number in [0, 1) determined only by `parts` (stable across runs/machines).

    Text is hashed as UTF-8; a file name that is not valid UTF-8 (which Python holds with
    surrogate escapes) hashes as its escapes, so it is split like any other name.
    """
    key = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0 ** 64


def _hashes(seed: int, purpose: str, class_names: Sequence[str], labels: np.ndarray,
            paths: Sequence[str]) -> np.ndarray:
    return np.array([unit_hash(seed, purpose, class_names[l] if l >= 0 else "", p)
                     for l, p in zip(labels, paths)], np.float64)


def check_fractions(val_fraction: float = 0.0, test_fraction: float = 0.0,
                    open_set_holdout: float = 0.0) -> None:
    """Raises ConfigError unless each fraction is in [0, 1) and val + test leaves train some;
    `open_set_holdout` may also be a whole count >= 2 (see `holdout_count`)."""
    holdout_count(open_set_holdout)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{name} must be in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(f"data.val_fraction + data.test_fraction must be below 1 (got "
                          f"{val_fraction} + {test_fraction}): nothing would be left to train on")


def check_caps(*, max_classes: int = 0, max_per_class: int = 0, max_images: int = 0) -> None:
    """Raises ConfigError for a negative cap, or max_classes=1 (training needs 2 classes)."""
    for name, value in (("max_classes", max_classes), ("max_per_class", max_per_class),
                        ("max_images", max_images)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ConfigError(f"data.{name} must be an integer >= 0 (0 = no cap), got {value!r}")
    if max_classes == 1:
        raise ConfigError(f"data.max_classes=1 leaves a single class; training needs at least "
                          f"{MIN_TRAIN_CLASSES} (0 = all classes)")


def check_exact_below(value) -> int:
    """`data.exact_counts_below` as an int >= 0 (0 = hash thresholds for every class)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"data.exact_counts_below must be a whole number >= 0 (classes with "
                          f"fewer images are split by exact counts; 0 = never), got {value!r}")
    return int(value)


def _side_counts(u_sorted: np.ndarray, val_fraction: float, test_fraction: float,
                 exact_below: int = EXACT_COUNTS_BELOW) -> tuple[int, int]:
    """(val count, test count) of one class from its sorted hashes, after the minimums."""
    n = len(u_sorted)
    if n < exact_below:  # exact counts, rounded half up
        k_val, k_test = int(val_fraction * n + 0.5), int(test_fraction * n + 0.5)
    else:
        k_val = int(np.searchsorted(u_sorted, val_fraction, side="left"))            # u < val
        k_test = n - int(np.searchsorted(u_sorted, 1.0 - test_fraction, side="left"))  # u >= 1-t
    k = {VAL: k_val, TRAIN: n - k_val - k_test, TEST: k_test}
    wanted = [TRAIN] + [TEST] * (test_fraction > 0) + [VAL] * (val_fraction > 0)
    for side in wanted:
        if k[side]:
            continue
        donors = [s for s in k if s != side and k[s] > 1]
        if donors:  # the fullest side gives one file (train on ties)
            donor = max(donors, key=lambda s: (k[s], s == TRAIN))
        elif side == TRAIN:  # n <= 2 with no train file: train still gets one
            donor = VAL if k[VAL] else TEST
        else:
            continue
        k[donor] -= 1
        k[side] += 1
    return k[VAL], k[TEST]


def split_sides(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
                val_fraction: float, test_fraction: float, seed: int,
                exact_below: int = EXACT_COUNTS_BELOW) -> np.ndarray:
    """Stratified, stable train/val/test split (see the module docstring): returns side codes
    int8 [N] (TRAIN, VAL, TEST; NONE for rows with label -1). Classes of fewer than
    `exact_below` images get exact counts (0: hash thresholds for all, the rule of runs saved
    before data.exact_counts_below existed)."""
    check_fractions(val_fraction, test_fraction)
    check_exact_below(exact_below)
    labels = np.asarray(labels)
    u = _hashes(seed, "split", class_names, labels, paths)
    sides = np.full(len(labels), NONE, np.int8)
    rows = np.flatnonzero(labels >= 0)
    rows = rows[np.lexsort((u[rows], labels[rows]))]  # by class, then by hash
    starts = np.flatnonzero(np.r_[True, np.diff(labels[rows]) != 0])
    for group in np.split(rows, starts[1:]):
        if len(group) == 0:
            continue
        k_val, k_test = _side_counts(u[group], val_fraction, test_fraction, exact_below)
        sides[group] = TRAIN
        sides[group[:k_val]] = VAL
        sides[group[len(group) - k_test:]] = TEST
    return sides


def limit_rows(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
               max_classes: int = 0, max_per_class: int = 0, max_images: int = 0,
               min_images: int = 1, seed: int = 0) -> np.ndarray:
    """Rows kept by the quick-experiment caps (0 = no cap), chosen by hash, in listing order.

    max_classes picks among classes with at least `min_images` files; max_per_class and
    max_images keep each class's / the whole set's lowest-hash files. The hash purpose differs
    from the split's, so a capped class still gets a representative val side.

    Raises:
      ConfigError: a negative cap, or max_classes=1.
    """
    check_caps(max_classes=max_classes, max_per_class=max_per_class, max_images=max_images)
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


def _split_classes(rows: np.ndarray, paths: Sequence[str], labels: np.ndarray,
                   class_names: Sequence[str], *, val_fraction: float, test_fraction: float,
                   seed: int, min_images: int, what: str = "classes",
                   exact_below: int = EXACT_COUNTS_BELOW
                   ) -> tuple[list[str], Subset, Subset, Subset, list[tuple[str, str]]]:
    """Splits `rows` (global indices) per class; returns kept class names, train, val, test
    and the excluded classes. Raises DataError unless 2+ classes have `min_images` images."""
    if min_images < 1:
        raise ConfigError(f"data.min_images_per_class must be >= 1, got {min_images}")
    labels = np.asarray(labels)
    counts = np.bincount(labels[rows], minlength=len(class_names))
    present = [c for c in range(len(class_names)) if counts[c] > 0]
    kept = [c for c in present if counts[c] >= min_images]
    excluded = [(class_names[c], f"class with < {min_images} images (min_images_per_class)")
                for c in present if counts[c] < min_images]
    excluded += [(class_names[c], "class with 1 image: train only") for c in kept if counts[c] == 1]
    if len(kept) < MIN_TRAIN_CLASSES:
        raise DataError(
            f"training needs at least {MIN_TRAIN_CLASSES} classes with >= {min_images} images "
            f"(data.min_images_per_class), but only {len(kept)} of the {len(present)} {what} "
            f"({len(rows)} images, after caps and decoding) qualify; largest class: "
            f"{counts.max() if len(counts) else 0} images. Add classes or relax data.max_classes / "
            f"data.min_images_per_class")
    remap = np.full(len(class_names), -1, np.int32)
    remap[kept] = np.arange(len(kept), dtype=np.int32)
    rows = rows[remap[labels[rows]] >= 0]
    sides = split_sides([paths[r] for r in rows], labels[rows], class_names,
                        val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                        exact_below=exact_below)
    new = remap[labels[rows]]
    train, val, test = (Subset(rows[sides == s], new[sides == s]) for s in (TRAIN, VAL, TEST))
    return [class_names[c] for c in kept], train, val, test, excluded


def closed_set(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
               val_fraction: float, test_fraction: float, seed: int, min_images: int = 2,
               rows: np.ndarray | None = None, exact_below: int = EXACT_COUNTS_BELOW) -> Split:
    """Per class, images split into train, val and test; retrieval queries test against train.

    val only selects the model (early stopping, best checkpoint). With test_fraction=0 there is
    no test side and val doubles as the query set, as in the paper: those scores are optimistic,
    since the checkpoint was picked on the same images.
    """
    labels = np.asarray(labels)
    rows = np.flatnonzero(labels >= 0) if rows is None else np.asarray(rows, np.int64)
    names, train, val, test, excluded = _split_classes(
        rows, paths, labels, class_names, val_fraction=val_fraction,
        test_fraction=test_fraction, seed=seed, min_images=min_images, exact_below=exact_below)
    query = test if test_fraction > 0 else val
    if len(query) == 0:
        side = "test" if test_fraction > 0 else "val"
        raise DataError(f"no image landed in the {side} split (every class is too small: a class "
                        f"needs 2 images for one query, 3 to fill both val and test), so there "
                        f"is nothing to query with; add images")
    return Split("closed_set", names, train, val, query, train, names, excluded)


def holdout_count(holdout) -> int:
    """0 when `data.open_set_holdout` is a fraction in [0, 1), else the whole count (>= 2) of
    identities it asks to hold out; ConfigError for anything else. One held-out identity is
    refused: every result would be relevant and every metric 1."""
    ok = isinstance(holdout, numbers.Real) and not isinstance(holdout, bool)
    if ok and 0.0 <= holdout < 1.0:
        return 0
    if ok and holdout >= 2 and float(holdout).is_integer():
        return int(holdout)
    raise ConfigError(f"data.open_set_holdout must be in [0, 1) (a fraction of the "
                      f"identities) or a whole count >= 2 (how many identities to hold out), "
                      f"got {holdout!r}")


def open_set(paths: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *,
             holdout: float, min_eval_images: int, val_fraction: float, seed: int,
             min_images: int = 2, exact_below: int = EXACT_COUNTS_BELOW) -> Split:
    """Identity-disjoint: held-out identities are never trained on and are evaluated
    leave-one-out (gallery=None); the rest split train/val (no test side: the held-out
    identities are the test).

    Only identities with at least `min_eval_images` (and 2) images can be held out, since
    the others could not be evaluated. A fractional `holdout` holds out each such identity
    whose hash is below it: at least one, and held-out identities go back to training
    (highest hash first) while fewer than 2 identities would be left to train on. A whole
    `holdout` >= 2 holds out that many, lowest hash first (a DataError if there are not that
    many, or if fewer than 2 identities would be left to train on); a new identity with a lower
    hash can take an old one's place. Fewer than MIN_OPEN_SET_IDENTITIES held out prints a
    warning: the evaluation's scores are then close to chance (the report gives chance levels).
    """
    check_fractions(val_fraction, 0.0, holdout)
    count = holdout_count(holdout)
    if holdout <= 0:
        raise ConfigError("data.protocol=open_set needs data.open_set_holdout > 0")
    labels = np.asarray(labels)
    counts = np.bincount(labels[labels >= 0], minlength=len(class_names))
    need = max(min_eval_images, 2)
    eligible = counts >= need
    if not eligible.any():
        raise DataError(f"open_set needs identities with at least open_set_min_images={need} "
                        f"images to hold out; the largest has {counts.max() if len(counts) else 0}")
    u = np.array([unit_hash(seed, "identity", n) for n in class_names])
    trainable = counts >= max(min_images, 1)
    if count:
        held = _hold_out_count(count, eligible, trainable, u, need)
    else:
        held = eligible & (u < holdout)
        if not held.any():
            held[np.flatnonzero(eligible)[np.argmin(u[eligible])]] = True
        while (trainable & ~held).sum() < MIN_TRAIN_CLASSES and (held & trainable).sum() > 1:
            back = np.flatnonzero(held & trainable)
            held[back[np.argmax(u[back])]] = False
    if held.sum() < MIN_OPEN_SET_IDENTITIES:
        print(f"warning: open_set holds out only {held.sum()} identities (fewer than "
              f"{MIN_OPEN_SET_IDENTITIES}): its scores are close to what a random ranking gets "
              f"(the report gives chance levels); hold out more, e.g. "
              f"data.open_set_holdout={MIN_OPEN_SET_IDENTITIES} (a count)", flush=True)
    row_held = (labels >= 0) & held[np.maximum(labels, 0)]
    train_rows = np.flatnonzero((labels >= 0) & ~row_held)
    names, train, val, _, excluded = _split_classes(
        train_rows, paths, labels, class_names, val_fraction=val_fraction, test_fraction=0.0,
        seed=seed, min_images=min_images, what="identities left after the holdout",
        exact_below=exact_below)
    q = np.flatnonzero(row_held)
    query = Subset(q, labels[q])
    return Split("open_set", names, train, val, query, None, list(class_names), excluded)


def _hold_out_count(count: int, eligible: np.ndarray, trainable: np.ndarray, u: np.ndarray,
                    need: int) -> np.ndarray:
    """The `count` eligible identities with the lowest hashes; DataError if that is more
    than there are, or leaves fewer than MIN_TRAIN_CLASSES identities to train on."""
    if count > eligible.sum():
        raise DataError(f"data.open_set_holdout={count} asks for {count} held-out identities, but "
                        f"only {eligible.sum()} have at least open_set_min_images={need} images; "
                        f"lower the count or data.open_set_min_images")
    order = np.flatnonzero(eligible)[np.argsort(u[eligible], kind="stable")]
    held = np.zeros(len(u), bool)
    held[order[:count]] = True
    left = int((trainable & ~held).sum())
    if left < MIN_TRAIN_CLASSES:
        raise DataError(f"data.open_set_holdout={count} leaves {left} identities to train on; "
                        f"training needs {MIN_TRAIN_CLASSES}: hold out fewer")
    return held


def check_disjoint(split: Split) -> None:
    """Raises DataError if any held-out (query) identity also appears in training."""
    train_ids = {split.class_names[l] for l in np.unique(split.train.labels)}
    query_ids = {split.identity_names[l] for l in np.unique(split.query.labels) if l >= 0}
    if split.protocol == "open_set" and train_ids & query_ids:
        raise DataError(f"open_set identities overlap: {sorted(train_ids & query_ids)[:5]}")
