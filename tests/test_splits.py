"""Hash-based splits: stratified, seeded, stable when files are added; protocols and LOO."""

import numpy as np
import pytest

from facejax.data import splits
from facejax.data.splits import (
    Subset,
    closed_set,
    drop_self,
    eval_sets,
    limit_rows,
    open_set,
    split_val,
    unit_hash,
)
from facejax.errors import ConfigError, DataError


def _dataset(counts: dict[str, int]):
    names = sorted(counts)
    paths, labels = [], []
    for k, name in enumerate(names):
        paths += [f"{name}/img_{i:04d}.jpg" for i in range(counts[name])]
        labels += [k] * counts[name]
    return paths, np.array(labels, np.int32), names


def _sides(paths, labels, names, **kw):
    is_val = split_val(paths, labels, names, **kw)
    return {p: bool(v) for p, v in zip(paths, is_val)}


def test_unit_hash_is_deterministic_uniform_and_seeded():
    values = [unit_hash(0, "split", "cls", f"f{i}") for i in range(2000)]
    assert values == [unit_hash(0, "split", "cls", f"f{i}") for i in range(2000)]
    assert 0.0 <= min(values) and max(values) < 1.0 and abs(np.mean(values) - 0.5) < 0.03
    assert unit_hash(1, "split", "cls", "f0") != unit_hash(0, "split", "cls", "f0")


def test_split_is_stratified_seeded_and_repeatable():
    paths, labels, names = _dataset({"a": 200, "b": 100, "c": 50})
    first = split_val(paths, labels, names, val_fraction=0.3, seed=0)
    np.testing.assert_array_equal(first, split_val(paths, labels, names, val_fraction=0.3, seed=0))
    for c in range(3):
        assert 0.2 < first[labels == c].mean() < 0.4
    other_seed = split_val(paths, labels, names, val_fraction=0.3, seed=1)
    assert (first != other_seed).sum() > 50


def test_adding_files_never_moves_old_ones():
    before = _dataset({"a": 40, "b": 30, "c": 25})
    after = _dataset({"a": 55, "b": 31, "c": 25, "new": 12})
    old = _sides(*before, val_fraction=0.2, seed=3)
    new = _sides(*after, val_fraction=0.2, seed=3)
    assert {p: new[p] for p in old} == old
    # Independent of listing order too.
    p, l, n = after
    order = np.random.default_rng(0).permutation(len(p))
    shuffled = _sides([p[i] for i in order], l[order], n, val_fraction=0.2, seed=3)
    assert shuffled == new


def test_every_class_with_two_images_has_both_sides():
    paths, labels, names = _dataset({f"id{k:03d}": 2 for k in range(100)} | {"solo": 1})
    is_val = split_val(paths, labels, names, val_fraction=0.2, seed=0)
    for c, name in enumerate(names):
        assert is_val[labels == c].sum() == (0 if name == "solo" else 1)


def test_forced_file_returns_to_its_side_once_a_new_file_lands_there():
    # The documented exception to stability: a class with no file under the threshold gets
    # its lowest-hash file forced to val; once a new file falls under it, that one replaces it.
    frac, seed = 0.05, 0
    names = ["k"]
    paths = ["k/a.jpg", "k/b.jpg", "k/c.jpg"]
    while any(unit_hash(seed, "split", "k", p) < frac for p in paths):
        paths = [p.replace(".jpg", "x.jpg") for p in paths]
    u = [unit_hash(seed, "split", "k", p) for p in paths]
    is_val = split_val(paths, np.zeros(3, np.int32), names, val_fraction=frac, seed=seed)
    assert is_val.tolist() == [i == int(np.argmin(u)) for i in range(3)]
    extra = next(f"k/n{i}.jpg" for i in range(10_000)
                 if unit_hash(seed, "split", "k", f"k/n{i}.jpg") < frac)
    grown = split_val(paths + [extra], np.zeros(4, np.int32), names, val_fraction=frac, seed=seed)
    assert grown.tolist() == [False, False, False, True]


def test_unlabelled_rows_are_never_val_and_bad_fraction_is_rejected():
    paths, labels, names = _dataset({"a": 10})
    labels[:5] = -1
    assert not split_val(paths, labels, names, val_fraction=0.5, seed=0)[:5].any()
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_val(paths, labels, names, val_fraction=bad, seed=0)


def test_limit_rows_caps_stably():
    paths, labels, names = _dataset({"a": 20, "b": 8, "c": 1, "d": 15})
    rows = limit_rows(paths, labels, names, max_per_class=5, seed=0)
    assert np.bincount(labels[rows]).tolist() == [5, 5, 1, 5]
    assert np.all(np.diff(rows) > 0)  # listing order kept
    np.testing.assert_array_equal(rows, limit_rows(paths, labels, names, max_per_class=5, seed=0))
    assert not np.array_equal(rows, limit_rows(paths, labels, names, max_per_class=5, seed=1))
    # Growing class 'a' leaves the other classes' picks alone, and a file dropped before is
    # never picked after (new files can only displace old ones).
    grown = _dataset({"a": 30, "b": 8, "c": 1, "d": 15})
    grown_kept = {grown[0][r] for r in limit_rows(*grown, max_per_class=5, seed=0)}
    old_kept = {paths[r] for r in rows}
    assert {p for p in grown_kept if not p.startswith("a/")} == {
        p for p in old_kept if not p.startswith("a/")}
    assert {p for p in grown_kept if p.startswith("a/")} <= old_kept | set(grown[0][20:30])

    chosen = limit_rows(paths, labels, names, max_classes=2, min_images=2, seed=0)
    kept_classes = set(labels[chosen].tolist())
    assert len(kept_classes) == 2 and 2 not in kept_classes  # 'c' has 1 image: not eligible
    assert all((labels[chosen] == c).sum() == (labels == c).sum() for c in kept_classes)

    few = limit_rows(paths, labels, names, max_images=10, seed=0)
    assert len(few) == 10
    assert len(limit_rows(paths, labels, names)) == len(paths)


def test_closed_set_protocol():
    paths, labels, names = _dataset({"a": 10, "b": 6, "single": 1, "z": 4})
    s = closed_set(paths, labels, names, val_fraction=0.25, seed=0, min_images=2)
    assert s.protocol == "closed_set" and s.class_names == ["a", "b", "z"]
    assert set(s.train.indices) & set(s.val.indices) == set()
    single_row = paths.index("single/img_0000.jpg")
    assert sorted(set(s.train.indices) | set(s.val.indices)) == [
        i for i in range(len(paths)) if i != single_row]
    # Labels are remapped to 0..C-1 over the kept classes and match the source class.
    for subset in (s.train, s.val):
        assert [s.class_names[l] for l in subset.labels] == [names[labels[i]] for i in subset.indices]
    assert s.query is s.val and s.gallery is s.train and s.identity_names == s.class_names
    assert s.excluded == [("single", "class with < 2 images (min_images_per_class)")]


def test_closed_set_with_min_images_one_keeps_singletons_in_train():
    paths, labels, names = _dataset({"a": 5, "single": 1})
    s = closed_set(paths, labels, names, val_fraction=0.2, seed=0, min_images=1)
    assert s.class_names == ["a", "single"]
    assert 1 in s.train.labels.tolist() and 1 not in s.val.labels.tolist()
    assert ("single", "class with 1 image: train only") in s.excluded


def test_closed_set_errors():
    paths, labels, names = _dataset({"a": 1, "b": 1})
    with pytest.raises(DataError, match="min_images_per_class=2"):
        closed_set(paths, labels, names, val_fraction=0.2, seed=0, min_images=2)
    with pytest.raises(DataError, match="nothing to validate"):
        closed_set(paths, labels, names, val_fraction=0.2, seed=0, min_images=1)
    with pytest.raises(ConfigError, match="min_images_per_class"):
        closed_set(paths, labels, names, val_fraction=0.2, seed=0, min_images=0)


def test_open_set_identities_are_disjoint_and_stable():
    counts = {f"id{k:03d}": 2 + (k % 9) for k in range(120)}
    paths, labels, names = _dataset(counts)
    kw = {"holdout": 0.25, "min_eval_images": 5, "val_fraction": 0.2, "seed": 7, "min_images": 2}
    s = open_set(paths, labels, names, **kw)
    assert s.protocol == "open_set" and s.gallery is None
    train_ids = {s.class_names[l] for l in s.train.labels}
    val_ids = {s.class_names[l] for l in s.val.labels}
    query_ids = {s.identity_names[l] for l in s.query.labels}
    assert train_ids and query_ids and not (train_ids & query_ids)
    assert val_ids <= train_ids
    assert all(counts[q] >= 5 for q in query_ids)
    eligible = [n for n in names if counts[n] >= 5]
    assert 0.1 < len(query_ids) / len(eligible) < 0.4
    # Every image of a held-out identity is a query, labelled with its identity.
    for row, label in zip(s.query.indices, s.query.labels):
        assert names[labels[row]] == s.identity_names[label]
    assert sum(counts[q] for q in query_ids) == len(s.query)
    splits.check_disjoint(s)
    again = open_set(paths, labels, names, **kw)
    np.testing.assert_array_equal(again.query.indices, s.query.indices)
    np.testing.assert_array_equal(again.train.indices, s.train.indices)
    # Adding identities does not move the old held-out ones.
    more = _dataset(counts | {f"new{k}": 6 for k in range(30)})
    bigger = open_set(*more, **kw)
    assert {bigger.identity_names[l] for l in bigger.query.labels} & set(names) == query_ids


def test_open_set_needs_an_identity_to_hold_out():
    paths, labels, names = _dataset({"a": 3, "b": 4})
    with pytest.raises(DataError, match="open_set_min_images=5"):
        open_set(paths, labels, names, holdout=0.2, min_eval_images=5, val_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match="open_set_holdout"):
        open_set(paths, labels, names, holdout=1.5, min_eval_images=2, val_fraction=0.2, seed=0)
    # Tiny holdout still holds out one identity; total holdout still leaves one to train.
    low = open_set(paths, labels, names, holdout=1e-9, min_eval_images=2, val_fraction=0.3, seed=0)
    high = open_set(paths, labels, names, holdout=1 - 1e-9, min_eval_images=2, val_fraction=0.3,
                    seed=0)
    for s in (low, high):
        assert len(set(s.query.labels.tolist())) == 1 and len(s.class_names) == 1


def test_check_disjoint_catches_overlap():
    bad = splits.Split("open_set", ["a"], Subset([0], [0]), Subset([], []), Subset([1], [0]),
                       None, ["a"], [])
    with pytest.raises(DataError, match="overlap"):
        splits.check_disjoint(bad)


def test_leave_one_out_helpers():
    q = Subset([10, 11, 12], [0, 0, 1])
    assert eval_sets(q, None) == (q, q, True)
    g = Subset([1, 2], [0, 1])
    assert eval_sets(q, g) == (q, g, False)
    # Gallery = the queries themselves; each row's own position must disappear.
    neighbors = np.array([[0, 1, 2], [0, 1, 2], [1, 2, 0]])
    out = drop_self(neighbors, q.indices, q.indices, k=2)
    np.testing.assert_array_equal(out, [[1, 2], [0, 2], [1, 0]])
    # When the self-match is absent, the first k stay.
    np.testing.assert_array_equal(drop_self(np.array([[1, 2, 0]]), np.array([99]), q.indices, 2),
                                  [[1, 2]])
