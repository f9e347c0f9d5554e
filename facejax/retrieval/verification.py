"""Pair verification (LFW View-2 style): read a pairs file and run the k-fold threshold protocol.

NumPy only. A score is "higher = more alike": the cosine similarity, or minus the euclidean
distance; thresholds are reported in the metric's own units (cosine: same if >= t; euclidean:
same if distance < t, dlib's convention with t = 0.6 on its raw descriptors).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from facejax.errors import ConfigError, DataError

METRICS = ("cosine", "euclidean")
DEFAULT_FARS = (1e-3,)
_SHOW = 5  # problems listed in an error message before "and N more"


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Parsed pairs: `left[i]`, `right[i]` are image paths relative to the images root."""
    left: list[str]
    right: list[str]
    same: np.ndarray     # bool [P]
    fold: np.ndarray     # int32 [P], 0..num_folds-1
    num_folds: int
    lines: np.ndarray    # int32 [P], 1-based line number of each pair in the file

    def __len__(self) -> int:
        return len(self.left)

    def images(self) -> list[str]:
        """Every image named, once, in order of first appearance."""
        return list(dict.fromkeys(p for pair in zip(self.left, self.right) for p in pair))

    def summary(self) -> str:
        n_same = int(self.same.sum())
        people = {p.split("/")[0] for p in self.images()}
        return (f"{len(self)} pairs ({n_same} same, {len(self) - n_same} different) in "
                f"{self.num_folds} folds over {len(self.images())} images of "
                f"{len(people)} identities")

    def subset(self, keep: np.ndarray) -> Pairs:
        keep = np.asarray(keep, bool)
        return Pairs([p for p, k in zip(self.left, keep) if k],
                     [p for p, k in zip(self.right, keep) if k],
                     self.same[keep], self.fold[keep], self.num_folds, self.lines[keep])


def image_path(name: str, number: int, ext: str = ".jpg") -> str:
    """LFW's naming: `Name/Name_0001.jpg`."""
    return f"{name}/{name}_{number:04d}{ext}"


def _number(field: str, where: str) -> int:
    try:
        n = int(field)
    except ValueError:
        raise DataError(f"{where}: image number {field!r} is not a whole number") from None
    if n < 1:
        raise DataError(f"{where}: image numbers start at 1, got {n}")
    return n


def read_pairs(path: str, root: str | None = None, ext: str = ".jpg") -> Pairs:
    """Parses an LFW-style pairs file.

    The first line is `<folds> <pairs per kind>`; then each fold holds that many same-person
    lines `name n1 n2` followed by as many different-person lines `name1 n1 name2 n2`
    (whitespace separated, blank lines ignored). With `root`, every named image must exist
    as `root/Name/Name_0001<ext>`.

    Raises:
      DataError: a missing or unreadable file, a malformed line (with its number), folds that
        do not match the header, or images missing under `root` (counted, first few listed).
    """
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read().splitlines()
    except FileNotFoundError:
        raise DataError(f"pairs file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read pairs file {path}: {e}") from None
    lines = [(i + 1, line.split()) for i, line in enumerate(raw) if line.strip()]
    if not lines:
        raise DataError(f"pairs file {path} is empty")
    head_no, head = lines[0]
    try:
        num_folds, per_kind = (int(v) for v in head)
    except ValueError:
        raise DataError(f"{path} line {head_no}: expected the header '<folds> <pairs per kind>' "
                        f"(e.g. '10 300'), got {' '.join(head)!r}") from None
    if num_folds < 2 or per_kind < 1:
        raise DataError(f"{path} line {head_no}: need at least 2 folds and 1 pair per kind, "
                        f"got {num_folds} folds of {per_kind}")
    body = lines[1:]
    expected = num_folds * 2 * per_kind
    if len(body) != expected:
        raise DataError(f"{path}: the header promises {num_folds} folds x 2 x {per_kind} = "
                        f"{expected} pairs, the file has {len(body)} pair lines")
    left, right, same, fold, numbers = [], [], [], [], []
    for k, (line_no, fields) in enumerate(body):
        where = f"{path} line {line_no}"
        want_same = (k % (2 * per_kind)) < per_kind  # the standard layout within a fold
        if len(fields) == 3 and want_same:
            name, a, b = fields
            left.append(image_path(name, _number(a, where), ext))
            right.append(image_path(name, _number(b, where), ext))
        elif len(fields) == 4 and not want_same:
            left.append(image_path(fields[0], _number(fields[1], where), ext))
            right.append(image_path(fields[2], _number(fields[3], where), ext))
        else:
            kind = "same-person 'name n1 n2'" if want_same else \
                "different-person 'name1 n1 name2 n2'"
            raise DataError(f"{where}: expected a {kind} line (fold {k // (2 * per_kind) + 1} "
                            f"lists {per_kind} same then {per_kind} different pairs), got "
                            f"{' '.join(fields)!r}")
        same.append(want_same)
        fold.append(k // (2 * per_kind))
        numbers.append(line_no)
    pairs = Pairs(left, right, np.asarray(same, bool), np.asarray(fold, np.int32), num_folds,
                  np.asarray(numbers, np.int32))
    if root is not None:
        check_images(pairs, root, path)
    return pairs


def check_images(pairs: Pairs, root: str, path: str = "pairs file") -> None:
    """DataError listing (with line numbers) the pairs' images that are missing under `root`."""
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} not found")
    missing = {}
    for p, line_no in zip(pairs.left + pairs.right, np.concatenate([pairs.lines, pairs.lines])):
        if p not in missing and not os.path.isfile(os.path.join(root, p)):
            missing[p] = int(line_no)
    if missing:
        shown = "; ".join(f"{p} (line {n})" for p, n in list(missing.items())[:_SHOW])
        more = f" and {len(missing) - _SHOW} more" if len(missing) > _SHOW else ""
        raise DataError(f"{len(missing)} images named in {path} are missing under {root}: "
                        f"{shown}{more}")


# ----------------------------------------------------------------------------- protocol

def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"verification metric must be one of {METRICS}, got {metric!r}")
    return metric


def pair_scores(emb_a: np.ndarray, emb_b: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Similarity of row i of `emb_a` and `emb_b` (higher = more alike) -> f64 [P].

    cosine: the vectors are L2-normalised first. euclidean: minus the distance of the vectors
    as given (for dlib's 0.6 rule, pass its raw descriptors).
    """
    check_metric(metric)
    a, b = np.asarray(emb_a, np.float64), np.asarray(emb_b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise DataError(f"pair embeddings must be two [P, D] arrays of one shape, got "
                        f"{a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("pair embeddings contain NaN or infinite values")
    if metric == "cosine":
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return np.sum(a * b, axis=1)
    return -np.linalg.norm(a - b, axis=1)


def _to_units(score_threshold: float, metric: str) -> float:
    return float(score_threshold) if metric == "cosine" else float(-score_threshold)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the cut that classifies most pairs right as "same if s >= t".

    Candidate cuts lie halfway between consecutive distinct scores (and beyond both ends).
    Among equally good cuts the middle one is taken, so the choice does not lean on one side.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(same, bool)
    values, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y, minlength=len(values))
    neg = np.bincount(inverse, weights=~y, minlength=len(values))
    # Cut c (0..len(values)) predicts "same" for values[c:]: right = TN below + TP above.
    tn_below = np.concatenate([[0.0], np.cumsum(neg)])
    tp_above = pos.sum() - np.concatenate([[0.0], np.cumsum(pos)])
    correct = tn_below + tp_above
    best = np.flatnonzero(correct == correct.max())
    c = int(best[len(best) // 2])
    if c == 0:
        t = values[0] - 1.0
    elif c == len(values):
        t = values[-1] + 1.0
    else:
        t = (values[c - 1] + values[c]) / 2.0
    return float(t), float(correct[c] / len(s))


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    """Fraction of pairs right when "same" means score >= threshold."""
    s, y = np.asarray(scores), np.asarray(same, bool)
    return float(np.mean((s >= threshold) == y))


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    s, y = np.asarray(scores, np.float64), np.asarray(same, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return float("nan")
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value.
    upper = np.cumsum(counts)
    avg_rank = upper - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> tuple[float, float, float]:
    """(TAR, achieved FAR, score threshold) at the loosest threshold with FAR <= `far`.

    "Same" means score > threshold. With N different-person pairs the FAR steps in 1/N, so
    at FAR=1e-3 over LFW's 3,000 negatives at most 3 false accepts are allowed.
    """
    s, y = np.asarray(scores, np.float64), np.asarray(same, bool)
    neg = np.sort(s[~y])[::-1]
    if not len(neg) or not y.any():
        return float("nan"), float("nan"), float("nan")
    allowed = int(np.floor(far * len(neg) + 1e-9))
    # Threshold at the (allowed+1)-th highest negative: at most `allowed` negatives lie above,
    # fewer when scores tie there.
    t = neg[min(allowed, len(neg) - 1)]
    return float(np.mean(s[y] > t)), float(np.mean(neg > t)), float(t)


def k_fold_verification(scores: np.ndarray, same: np.ndarray, fold: np.ndarray, *,
                        metric: str = "cosine", fars=DEFAULT_FARS) -> dict:
    """The standard protocol: for each fold, pick the threshold that maximises accuracy on the
    other folds and measure accuracy on the held-out one.

    `scores` are "higher = more alike" (see `pair_scores`). Returns a JSON-able dict:
    accuracy (mean), accuracy_std (population std over folds, as LFW papers report it),
    fold_accuracies, thresholds (per fold, in the metric's units), auc, tar_at_far
    ({far: {tar, far, threshold}}, pooled over all pairs), and counts.
    """
    check_metric(metric)
    s = np.asarray(scores, np.float64)
    y = np.asarray(same, bool)
    f = np.asarray(fold)
    if not (s.shape == y.shape == f.shape) or s.ndim != 1:
        raise DataError(f"scores, labels and folds must be 1-D of one length, got {s.shape}, "
                        f"{y.shape} and {f.shape}")
    if not np.isfinite(s).all():
        raise DataError("verification scores contain NaN or infinite values")
    folds = np.unique(f)
    if len(folds) < 2:
        raise DataError(f"k-fold verification needs at least 2 folds, got {len(folds)}")
    accs, thresholds = [], []
    for k in folds:
        test = f == k
        if y[test].all() or not y[test].any():
            raise DataError(f"fold {int(k) + 1} lacks same-person or different-person pairs")
        t, _ = best_threshold(s[~test], y[~test])
        thresholds.append(_to_units(t, metric))
        accs.append(accuracy_at(s[test], y[test], t))
    accs = np.asarray(accs)
    t_all, acc_all = best_threshold(s, y)
    tars = {}
    for far in fars:
        tar, got_far, t = tar_at_far(s, y, far)
        tars[f"{far:g}"] = dict(tar=tar, far=got_far, threshold=_to_units(t, metric))
    return dict(
        metric=metric, num_pairs=int(len(s)), num_same=int(y.sum()),
        num_folds=int(len(folds)), accuracy=float(accs.mean()),
        accuracy_std=float(accs.std()), fold_accuracies=accs.tolist(),
        thresholds=thresholds, auc=roc_auc(s, y), tar_at_far=tars,
        best_threshold_all=_to_units(t_all, metric), best_accuracy_all=acc_all)


def verify_embeddings(pairs: Pairs, embeddings: np.ndarray, index_of: dict[str, int], *,
                      metric: str = "cosine", fars=DEFAULT_FARS) -> dict:
    """Runs `k_fold_verification` for `pairs` given one embedding row per image path."""
    try:
        a = np.asarray([index_of[p] for p in pairs.left])
        b = np.asarray([index_of[p] for p in pairs.right])
    except KeyError as e:
        raise DataError(f"no embedding for image {e.args[0]}") from None
    emb = np.asarray(embeddings)
    scores = pair_scores(emb[a], emb[b], metric)
    return k_fold_verification(scores, pairs.same, pairs.fold, metric=metric, fars=fars)


def format_result(result: dict, name: str = "LFW") -> str:
    """'LFW verification: 99.38 ± 0.27 % (10-fold), AUC 0.9990, TAR@FAR=1e-3 97.10 %'."""
    line = (f"{name} verification: {100 * result['accuracy']:.2f} ± "
            f"{100 * result['accuracy_std']:.2f} % ({result['num_folds']}-fold), "
            f"AUC {result['auc']:.4f}")
    for far, v in result["tar_at_far"].items():
        line += f", TAR@FAR={far} {100 * v['tar']:.2f} %"
    return line
