"""Hash-based splits: stratified, seeded, stable when files are added; caps and protocols."""

import numpy as np
import pytest

from facejax.data import splits
from facejax.data.splits import (
    TEST,
    TRAIN,
    VAL,
    Subset,
    check_fractions,
    closed_set,
    limit_rows,
    open_set,
    split_sides,
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
    return {p: int(s) for p, s in zip(paths, split_sides(paths, labels, names, **kw))}


def _seed_split_val(paths, labels, class_names, val_fraction, seed):
    """The seed's two-way rule, kept here as the reference for test_fraction=0."""
    u = np.array([unit_hash(seed, "split", class_names[l], p) for l, p in zip(labels, paths)])
    is_val = u < val_fraction
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) < 2:
            is_val[rows] = False
            continue
        if not is_val[rows].any():
            is_val[rows[np.argmin(u[rows])]] = True
        if is_val[rows].all():
            is_val[rows[np.argmax(u[rows])]] = False
    return is_val


def test_unit_hash_is_deterministic_uniform_and_seeded():
    values = [unit_hash(0, "split", "cls", f"f{i}") for i in range(2000)]
    assert values == [unit_hash(0, "split", "cls", f"f{i}") for i in range(2000)]
    assert 0.0 <= min(values) and max(values) < 1.0 and abs(np.mean(values) - 0.5) < 0.03
    assert unit_hash(1, "split", "cls", "f0") != unit_hash(0, "split", "cls", "f0")


def test_three_way_split_is_stratified_seeded_and_repeatable():
    paths, labels, names = _dataset({"a": 300, "b": 150, "c": 80})
    kw = dict(val_fraction=0.2, test_fraction=0.3, seed=0)
    first = split_sides(paths, labels, names, **kw)
    np.testing.assert_array_equal(first, split_sides(paths, labels, names, **kw))
    for c in range(3):
        side = first[labels == c]
        assert 0.1 < (side == VAL).mean() < 0.3 and 0.2 < (side == TEST).mean() < 0.4
        assert (side == TRAIN).mean() > 0.35
    other_seed = split_sides(paths, labels, names, **(kw | {"seed": 1}))
    assert (first != other_seed).sum() > 100
    # val is the low-hash end and does not depend on test_fraction; test comes out of train.
    no_test = split_sides(paths, labels, names, **(kw | {"test_fraction": 0.0}))
    np.testing.assert_array_equal(first == VAL, no_test == VAL)
    assert set(no_test[first == TEST].tolist()) == {TRAIN}


def test_adding_files_never_moves_old_ones():
    # Hash thresholds: every class with exact_below=0, by default classes of 200+ images.
    before = _dataset({"a": 40, "b": 30, "c": 25})
    after = _dataset({"a": 55, "b": 31, "c": 25, "new": 12})
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=3, exact_below=0)
    old = _sides(*before, **kw)
    new = _sides(*after, **kw)
    assert {p: new[p] for p in old} == old
    assert set(old.values()) == {TRAIN, VAL, TEST}
    # Independent of listing order too.
    p, l, n = after
    order = np.random.default_rng(0).permutation(len(p))
    assert _sides([p[i] for i in order], l[order], n, **kw) == new
    big = splits.EXACT_COUNTS_BELOW
    before = _dataset({"a": big, "b": big + 40})
    after = _dataset({"a": big + 30, "b": big + 41, "new": 12})
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=3)
    old = _sides(*before, **kw)
    assert {p: s for p, s in _sides(*after, **kw).items() if p in old} == old


def test_test_fraction_zero_is_the_seeds_train_val_split():
    rng = np.random.default_rng(0)
    counts = {f"c{k:02d}": int(n) for k, n in enumerate(rng.integers(1, 12, 60))}
    paths, labels, names = _dataset(counts)
    for frac, seed in ((0.2, 0), (0.05, 1), (0.6, 2)):
        sides = split_sides(paths, labels, names, val_fraction=frac, test_fraction=0.0, seed=seed,
                            exact_below=0)
        assert TEST not in sides
        np.testing.assert_array_equal(sides == VAL,
                                      _seed_split_val(paths, labels, names, frac, seed))
    s = closed_set(paths, labels, names, val_fraction=0.2, test_fraction=0.0, seed=0)
    assert s.query is s.val and s.gallery is s.train


def test_small_classes_fill_train_then_test_then_val():
    counts = {f"one{k}": 1 for k in range(20)} | {f"two{k}": 2 for k in range(200)}
    counts |= {f"three{k}": 3 for k in range(100)}
    paths, labels, names = _dataset(counts)
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=0, exact_below=0)
    sides = split_sides(paths, labels, names, **kw)
    u = np.array([unit_hash(0, "split", names[l], p) for l, p in zip(labels, paths)])
    eval_sides = []
    for c, name in enumerate(names):
        side = sides[labels == c]
        if name.startswith("one"):
            assert side.tolist() == [TRAIN]
        elif name.startswith("two"):
            assert sorted(side.tolist())[0] == TRAIN and (side != TRAIN).sum() == 1
            eval_sides.append(int(side[side != TRAIN][0]))
        else:
            assert sorted(side.tolist()) == [TRAIN, VAL, TEST]
        # Forced or not, the hash ranking holds: val lowest, test highest.
        cu = u[labels == c]
        if (side == VAL).any() and (side != VAL).any():
            assert cu[side == VAL].max() < cu[side != VAL].min()
        if (side == TEST).any() and (side != TEST).any():
            assert cu[side == TEST].min() > cu[side != TEST].max()
    # A 2-image class's second image goes to val or test by hash (test unless val was natural).
    assert 0.1 < eval_sides.count(VAL) / len(eval_sides) < 0.5
    # With exact counts (the default for small classes) it is always one query (test).
    exact = split_sides(paths, labels, names, **(kw | {"exact_below": 200}))
    two = np.isin(labels, [c for c, n in enumerate(names) if n.startswith("two")])
    assert (exact[two] == TEST).sum() == two.sum() // 2 and (exact[two] == VAL).sum() == 0
    # A side whose fraction is 0 is never filled.
    no_val = split_sides(paths, labels, names, val_fraction=0.0, test_fraction=0.2, seed=0,
                         exact_below=0)
    assert VAL not in no_val and (no_val == TEST).sum() >= 300


def test_forced_file_returns_to_its_side_once_a_new_file_lands_there():
    # The documented exception to stability: a class with no file under the threshold gets
    # its lowest-hash file forced to val; once a new file falls under it, that one replaces it.
    frac, seed = 0.05, 0
    names = ["k"]
    paths = ["k/a.jpg", "k/b.jpg", "k/c.jpg"]
    while any(unit_hash(seed, "split", "k", p) < frac for p in paths):
        paths = [p.replace(".jpg", "x.jpg") for p in paths]
    u = [unit_hash(seed, "split", "k", p) for p in paths]
    kw = dict(val_fraction=frac, test_fraction=0.0, seed=seed)
    sides = split_sides(paths, np.zeros(3, np.int32), names, **kw)
    assert sides.tolist() == [VAL if i == int(np.argmin(u)) else TRAIN for i in range(3)]
    extra = next(f"k/n{i}.jpg" for i in range(10_000)
                 if unit_hash(seed, "split", "k", f"k/n{i}.jpg") < frac)
    grown = split_sides(paths + [extra], np.zeros(4, np.int32), names, **kw)
    assert grown.tolist() == [TRAIN, TRAIN, TRAIN, VAL]


def test_unlabelled_rows_get_no_side_and_bad_fractions_are_rejected():
    paths, labels, names = _dataset({"a": 10})
    labels[:5] = -1
    sides = split_sides(paths, labels, names, val_fraction=0.3, test_fraction=0.3, seed=0)
    assert (sides[:5] == splits.NONE).all() and (sides[5:] != splits.NONE).all()
    for kw, match in [({"val_fraction": -0.1}, "val_fraction"),
                      ({"val_fraction": 1.0}, "val_fraction"),
                      ({"test_fraction": 1.5}, "test_fraction"),
                      ({"test_fraction": "0.2"}, "test_fraction"),
                      ({"val_fraction": 0.5, "test_fraction": 0.5}, "nothing would be left"),
                      ({"open_set_holdout": 1.0}, "open_set_holdout")]:
        with pytest.raises(ConfigError, match=match):
            check_fractions(**kw)
    with pytest.raises(ConfigError, match="must be below 1"):
        split_sides(paths, labels, names, val_fraction=0.6, test_fraction=0.4, seed=0)
    check_fractions(0.0, 0.0, 0.0)  # every fraction may be 0


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


@pytest.mark.parametrize("cap, value, match", [
    ("max_images", -3, "max_images must be an integer >= 0"),
    ("max_classes", -1, "max_classes must be an integer >= 0"),
    ("max_per_class", -2, "max_per_class must be an integer >= 0"),
    ("max_per_class", 2.5, "max_per_class must be an integer"),
    ("max_classes", 1, "max_classes=1 leaves a single class"),
])
def test_limit_rows_rejects_negative_and_degenerate_caps(cap, value, match):
    paths, labels, names = _dataset({"a": 5, "b": 5, "c": 5})
    with pytest.raises(ConfigError, match=match):
        limit_rows(paths, labels, names, **{cap: value})


def test_closed_set_protocol_queries_test_against_train():
    paths, labels, names = _dataset({"a": 30, "b": 12, "single": 1, "z": 3, "pair": 2})
    s = closed_set(paths, labels, names, val_fraction=0.25, test_fraction=0.25, seed=0,
                   min_images=2)
    assert s.protocol == "closed_set" and s.class_names == ["a", "b", "pair", "z"]
    sets = [set(x.indices.tolist()) for x in (s.train, s.val, s.query)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    single_row = paths.index("single/img_0000.jpg")
    assert sorted(sets[0] | sets[1] | sets[2]) == [i for i in range(len(paths)) if i != single_row]
    # The queries are the test side: the hash's top end of each class, never val.
    sides = split_sides(paths, labels, names, val_fraction=0.25, test_fraction=0.25, seed=0)
    assert sets[2] == {i for i in range(len(paths)) if sides[i] == TEST and i != single_row}
    assert s.gallery is s.train and s.identity_names == s.class_names
    # Labels are remapped to 0..C-1 over the kept classes and match the source class.
    for subset in (s.train, s.val, s.query):
        assert [s.class_names[l] for l in subset.labels] == [
            names[labels[i]] for i in subset.indices]
    for name in ("a", "b", "z"):  # 3+ images: every side has the class
        k = s.class_names.index(name)
        assert all(k in x.labels for x in (s.train, s.val, s.query))
    assert s.excluded == [("single", "class with < 2 images (min_images_per_class)")]


def test_closed_set_with_min_images_one_keeps_singletons_in_train():
    paths, labels, names = _dataset({"a": 5, "b": 4, "single": 1})
    s = closed_set(paths, labels, names, val_fraction=0.2, test_fraction=0.2, seed=0,
                   min_images=1)
    assert s.class_names == ["a", "b", "single"]
    assert 2 in s.train.labels.tolist()
    assert 2 not in s.val.labels.tolist() and 2 not in s.query.labels.tolist()
    assert ("single", "class with 1 image: train only") in s.excluded


def test_closed_set_errors():
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=0)
    paths, labels, names = _dataset({"a": 1, "b": 1, "c": 7})
    with pytest.raises(DataError, match=r"at least 2 classes with >= 2 images .* only 1 of the "
                                        r"3 classes \(9 images"):
        closed_set(paths, labels, names, min_images=2, **kw)
    with pytest.raises(DataError, match="nothing to query with"):
        closed_set(*_dataset({"a": 1, "b": 1}), min_images=1, **kw)
    with pytest.raises(DataError, match="no image landed in the val split"):
        closed_set(*_dataset({"a": 1, "b": 1}), min_images=1, val_fraction=0.2, test_fraction=0,
                   seed=0)
    with pytest.raises(ConfigError, match="min_images_per_class"):
        closed_set(paths, labels, names, min_images=0, **kw)


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
    # The trained identities split train/val only: every one of their images is on a side.
    assert len(s.train) + len(s.val) + len(s.query) == len(paths)
    splits.check_disjoint(s)
    again = open_set(paths, labels, names, **kw)
    np.testing.assert_array_equal(again.query.indices, s.query.indices)
    np.testing.assert_array_equal(again.train.indices, s.train.indices)
    # Adding identities does not move the old held-out ones.
    more = _dataset(counts | {f"new{k}": 6 for k in range(30)})
    bigger = open_set(*more, **kw)
    assert {bigger.identity_names[l] for l in bigger.query.labels} & set(names) == query_ids


def test_open_set_holds_out_one_and_keeps_two_to_train():
    paths, labels, names = _dataset({"a": 3, "b": 4, "c": 3})
    kw = dict(val_fraction=0.3, seed=0)
    with pytest.raises(DataError, match="open_set_min_images=5"):
        open_set(paths, labels, names, holdout=0.2, min_eval_images=5, **kw)
    with pytest.raises(ConfigError, match="open_set_holdout"):
        open_set(paths, labels, names, holdout=1.5, min_eval_images=2, **kw)
    with pytest.raises(ConfigError, match="open_set_holdout > 0"):
        open_set(paths, labels, names, holdout=0.0, min_eval_images=2, **kw)
    # Tiny holdout still holds out one identity; total holdout still leaves two to train.
    for holdout in (1e-9, 1 - 1e-9):
        s = open_set(paths, labels, names, holdout=holdout, min_eval_images=2, **kw)
        assert len(set(s.query.labels.tolist())) == 1 and len(s.class_names) == 2
    with pytest.raises(DataError, match="at least 2 classes .* identities left after the holdout"):
        open_set(*_dataset({"a": 3, "b": 4}), holdout=0.5, min_eval_images=2, **kw)


def test_check_disjoint_catches_overlap():
    bad = splits.Split("open_set", ["a"], Subset([0], [0]), Subset([], []), Subset([1], [0]),
                       None, ["a"], [])
    with pytest.raises(DataError, match="overlap"):
        splits.check_disjoint(bad)


def test_open_set_holdout_as_a_count_and_a_warning_for_few_identities(capsys):
    """24 identities: a 0.2 holdout kept 2 (Top-1 near trivial); a whole count holds out
    exactly that many, the lowest hashes; fewer than 10 held out prints a warning."""
    counts = {f"id{k:02d}": 6 for k in range(24)}
    paths, labels, names = _dataset(counts)
    kw = dict(min_eval_images=5, val_fraction=0.2, seed=3)
    s = open_set(paths, labels, names, holdout=10.0, **kw)
    held = {s.identity_names[l] for l in s.query.labels}
    assert len(held) == 10
    assert held == set(sorted(names, key=lambda n: unit_hash(3, "identity", n))[:10])
    assert not {s.class_names[l] for l in s.train.labels} & held
    assert "warning" not in capsys.readouterr().out
    check_fractions(open_set_holdout=10.0)  # the config check accepts a count
    two = open_set(paths, labels, names, holdout=2, **kw)
    assert len(set(two.query.labels.tolist())) == 2
    assert "holds out only 2 identities (fewer than 10)" in capsys.readouterr().out
    few = open_set(paths, labels, names, holdout=0.2, **kw)
    n_few = len(set(few.query.labels.tolist()))
    assert n_few < 10 and f"holds out only {n_few} identities" in capsys.readouterr().out
    for bad in (1.0, 1, 2.5, -3, True):  # one held-out identity makes every metric 1
        with pytest.raises(ConfigError, match="a whole count >= 2"):
            open_set(paths, labels, names, holdout=bad, **kw)
    with pytest.raises(DataError, match="asks for 25 held-out identities, but only 24 have"):
        open_set(paths, labels, names, holdout=25, **kw)
    with pytest.raises(DataError, match="leaves 1 identities to train on"):
        open_set(paths, labels, names, holdout=23, **kw)


def test_small_classes_get_exact_counts_ranked_by_hash():
    # 10 images a person: hash thresholds gave 6 queries to one and 1 to another; exact
    # counts give round(0.2 * 10) = 2 val and 2 test to each, still chosen by hash rank.
    counts = {f"p{k:02d}": 10 for k in range(40)} | {"two": 2, "five": 5, "big": 300}
    paths, labels, names = _dataset(counts)
    kw = dict(val_fraction=0.2, test_fraction=0.2, seed=0)
    sides = split_sides(paths, labels, names, **kw)
    u = np.array([unit_hash(0, "split", names[l], p) for l, p in zip(labels, paths)])
    for c, name in enumerate(names):
        side, cu = sides[labels == c], u[labels == c]
        n = len(side)
        if name == "big":  # large classes keep the hash thresholds
            np.testing.assert_array_equal(
                side, split_sides(paths, labels, names, **kw, exact_below=0)[labels == c])
            continue
        want = {"two": (1, 0, 1), "five": (3, 1, 1)}.get(name, (6, 2, 2))
        assert ((side == TRAIN).sum(), (side == VAL).sum(), (side == TEST).sum()) == want, name
        assert n < 3 or cu[side == VAL].max() < cu[side == TRAIN].min()
        assert cu[side == TEST].min() > cu[side == TRAIN].max()
    # The old rule (exact_below=0) is uneven on these classes: that is what this fixes.
    old = split_sides(paths, labels, names, **kw, exact_below=0)
    tests = [int((old[labels == c] == TEST).sum()) for c in range(40)]
    assert max(tests) - min(tests) >= 3
    with pytest.raises(ConfigError, match="exact_counts_below"):
        split_sides(paths, labels, names, **kw, exact_below=-1)
