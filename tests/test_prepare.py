"""prepare_data end to end for every source and protocol, plus the prepare_data script."""

import importlib.util
import os

import ml_collections
import numpy as np
import pytest
from conftest import CORPUS_BAD, class_colour, make_tiny_tfds, write_corpus, write_idx

from facejax import cli
from facejax.data import sources
from facejax.data.prepare import PreparedData, Subset, prepare_data
from facejax.errors import ConfigError, DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _colour_of(data: PreparedData, row: int) -> np.ndarray:
    return data.images[row].reshape(-1, 3).mean(0)


def _assert_labels_match_pixels(data: PreparedData, subset: Subset, names: list[str],
                                all_names: list[str]):
    """Each image's colour is the colour of the class its label names."""
    for row, label in zip(subset.indices, subset.labels):
        expected = class_colour(all_names.index(names[label]))
        np.testing.assert_allclose(_colour_of(data, row), expected, atol=4)


def test_folder_closed_set(image_folder, data_config, capsys):
    root, _ = image_folder({"a": 6, "b": 4, "c": 1, "d": 5})
    os.makedirs(os.path.join(root, "empty"))
    write_corpus(os.path.join(root, "zz_corpus_bad_only"))
    for name in os.listdir(os.path.join(root, "zz_corpus_bad_only")):
        if name not in CORPUS_BAD:
            os.remove(os.path.join(root, "zz_corpus_bad_only", name))
    data_config.root = root
    data_config.max_pixels = 5_000
    data = prepare_data(data_config)

    assert data.protocol == "closed_set" and data.root == root
    assert data.class_names == ["a", "b", "d"] and data.num_classes == 3
    assert data.images.shape == (16, 16, 16, 3) and data.images.dtype == np.uint8
    assert len(data.paths) == 16 and data.paths[0] == "a/a_000.png"
    sides = [set(x.indices.tolist()) for x in (data.train, data.val, data.query)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert len(set.union(*sides)) == 15  # all but the single image of 'c'
    assert data.train.indices.dtype == np.int64 and data.train.labels.dtype == np.int32
    # Closed-set queries are the test side (gallery = train); val only selects the model.
    assert len(data.query) > 0 and data.gallery is data.train
    assert set(data.query.labels.tolist()) == {0, 1, 2}  # 4+ images: every class has a query
    all_names = ["a", "b", "c", "d"]
    for subset in (data.train, data.val, data.query):
        _assert_labels_match_pixels(data, subset, data.class_names, all_names)
    reasons = dict(data.skipped)
    assert reasons["empty/"] == "empty class folder"
    assert reasons["c"] == "class with < 2 images (min_images_per_class)"
    for name, reason in CORPUS_BAD.items():
        assert reasons[f"zz_corpus_bad_only/{name}"] == reason
    out = capsys.readouterr().out
    assert "skipped 5 (" in out and "classes: 1 class with < 2 images" in out
    assert "training classes" in data.summary()


def test_closed_set_test_fraction_zero_queries_val(image_folder, data_config, capsys):
    root, _ = image_folder({"a": 6, "b": 5}, size=(4, 4))
    data_config.root = root
    with_test = prepare_data(data_config)
    data_config.test_fraction = 0.0
    data = prepare_data(data_config)
    assert data.query is data.val and data.gallery is data.train
    assert len(data.train) + len(data.val) == 11
    assert "retrieval scores are optimistic" in capsys.readouterr().out
    # val does not depend on test_fraction: the test side comes out of train.
    np.testing.assert_array_equal(data.val.indices, with_test.val.indices)
    assert set(with_test.query.indices) <= set(data.train.indices)
    # A run's config.json from before test_fraction existed reproduces the split it trained on.
    old = data_config.to_dict()
    del old["test_fraction"]
    legacy = prepare_data(ml_collections.ConfigDict(old))
    assert legacy.query.indices.tolist() == data.val.indices.tolist()
    np.testing.assert_array_equal(legacy.train.indices, data.train.indices)


def test_folder_open_set(image_folder, data_config):
    counts = {f"p{k:02d}": 2 + k % 7 for k in range(30)}
    root, _ = image_folder(counts, size=(4, 4))
    data_config.root = root
    data_config.protocol = "open_set"
    data_config.open_set_min_images = 5
    data_config.open_set_holdout = 0.3
    data = prepare_data(data_config)
    assert data.protocol == "open_set" and data.gallery is None
    trained = {data.class_names[l] for l in data.train.labels}
    held_out = {data.identity_names[l] for l in data.query.labels}
    assert held_out and trained and not (trained & held_out)
    assert all(counts[n] >= 5 for n in held_out)
    assert data.num_classes == len(trained)
    # test_fraction does not apply: every image of a trained identity is train or val.
    assert len(data.train) + len(data.val) + len(data.query) == len(data.images)
    names = sorted(counts)
    _assert_labels_match_pixels(data, data.query, data.identity_names, names)
    _assert_labels_match_pixels(data, data.train, data.class_names, names)


def test_caps_pick_subsets_before_decoding(image_folder, data_config):
    root, _ = image_folder({"a": 8, "b": 8, "c": 8, "d": 1}, size=(4, 4))
    data_config.root = root
    data_config.max_per_class = 3
    data = prepare_data(data_config)
    assert len(data.images) == 3 * 3 + 1
    data_config.max_classes = 2
    data = prepare_data(data_config)
    assert len(data.images) == 6 and data.num_classes == 2 and "d" not in data.class_names
    data_config.max_classes = 0
    data_config.max_per_class = 0
    data_config.max_images = 10
    first = prepare_data(data_config)
    assert len(first.images) == 10
    assert prepare_data(data_config).paths == first.paths


def test_competition_layout(tmp_path, data_config, image_folder):
    root = str(tmp_path / "comp")
    image_folder({"a": 4, "b": 3}, name="comp/training", size=(6, 6))
    image_folder({"b": 2, "new": 1}, name="comp/gallery", size=(6, 6))
    qroot, _ = image_folder({"q": 3}, name="comp/query_tmp", size=(6, 6))
    os.makedirs(os.path.join(root, "query"))
    for name in sorted(os.listdir(os.path.join(qroot, "q"))):  # flat, unlabelled queries
        os.rename(os.path.join(qroot, "q", name), os.path.join(root, "query", name))
    (tmp_path / "comp" / "query" / "broken.jpg").write_text("not a jpeg")
    os.removedirs(os.path.join(qroot, "q"))

    data_config.source = "competition"
    data_config.root = root
    data = prepare_data(data_config)
    assert data.protocol == "competition" and data.root == root
    assert data.class_names == ["a", "b"] and data.identity_names == ["a", "b", "new"]
    assert len(data.train) + len(data.val) == 7  # no test side: query/ and gallery/ are it
    assert [data.paths[i] for i in data.query.indices] == [
        "query/q_000.png", "query/q_001.png", "query/q_002.png"]
    assert data.query.labels.tolist() == [-1, -1, -1]
    assert [data.paths[i] for i in data.gallery.indices] == [
        "gallery/b/b_000.png", "gallery/b/b_001.png", "gallery/new/new_000.png"]
    assert data.gallery.labels.tolist() == [1, 1, 2]
    assert ("query/broken.jpg", "not an image") in data.skipped
    # The gallery's 'b' folder was written as class 0 of its own folder: colour of index 0.
    np.testing.assert_allclose(_colour_of(data, data.gallery.indices[0]), class_colour(0), atol=4)
    _assert_labels_match_pixels(data, data.train, data.class_names, ["a", "b"])


def test_idx_source(tmp_path, data_config, capsys):
    directory = tmp_path / "fashion-mnist"
    images = np.repeat(np.arange(20, dtype=np.uint8)[:, None, None] * 10, 28 * 28)
    images = images.reshape(20, 28, 28)
    write_idx(directory, images, np.arange(20) % 4)
    write_idx(directory, images[:3], [0, 1, 2], split="test")
    data_config.source = "idx"
    data_config.root = str(directory)
    data = prepare_data(data_config)
    assert data.images.shape == (20, 16, 16, 3)  # the 'train' split only
    assert data.class_names == sources.FASHION_MNIST_CLASSES[:4]
    for row in range(20):  # grey level i*10 of record i, in every channel
        assert int(data.paths[row].split("/")[1]) == row
        np.testing.assert_array_equal(data.images[row], np.full((16, 16, 3), row * 10))
    for subset in (data.train, data.val):
        assert (subset.labels == subset.indices % 4).all()
    assert "decoded 20 images" in capsys.readouterr().out
    again = prepare_data(data_config)
    assert again.cache_dir == data.cache_dir
    assert "reused cache of 20 images" in capsys.readouterr().out


def test_idx_without_root_uses_the_builtin_dataset(tmp_path, data_config, monkeypatch):
    directory = tmp_path / "builtin"
    write_idx(directory, np.zeros((6, 28, 28), np.uint8), [0, 1, 0, 1, 0, 1])
    monkeypatch.setattr(sources, "ensure_fashion_mnist", lambda: str(directory))
    data_config.source = "idx"
    assert prepare_data(data_config).root == str(directory)


def test_tfds_source(tmp_path, data_config):
    name = make_tiny_tfds(tmp_path / "tfds", {"a": 3, "b": 3, "c": 2})
    data_config.source = "tfds"
    data_config.tfds_name = name
    data_config.tfds_data_dir = str(tmp_path / "tfds")
    data = prepare_data(data_config)
    assert data.images.shape == (8, 16, 16, 3) and data.class_names == ["a", "b", "c"]
    _assert_labels_match_pixels(data, data.train, data.class_names, ["a", "b", "c"])
    _assert_labels_match_pixels(data, data.val, data.class_names, ["a", "b", "c"])


def test_bad_configs_and_unusable_data(tmp_path, data_config):
    for field, value, match in [("source", "s3", "data.source"),
                                ("protocol", "x", "data.protocol")]:
        cfg = data_config.copy_and_resolve_references()
        cfg[field] = value
        cfg.root = str(tmp_path)
        with pytest.raises(ConfigError, match=match):
            prepare_data(cfg)
    cfg = data_config.copy_and_resolve_references()
    cfg.source = "tfds"
    with pytest.raises(ConfigError, match="tfds_name"):
        prepare_data(cfg)
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.jpg").write_bytes(b"")
    data_config.root = str(tmp_path / "bad")
    with pytest.raises(DataError, match="no usable images"):
        prepare_data(data_config)


@pytest.mark.parametrize("field, value, match", [
    ("max_images", -3, "max_images must be an integer >= 0"),
    ("max_classes", -1, "max_classes must be an integer >= 0"),
    ("max_classes", 1, "max_classes=1"),
    ("val_fraction", 1.0, "val_fraction must be in"),
    ("test_fraction", -0.1, "test_fraction must be in"),
    ("test_fraction", 0.8, "val_fraction . data.test_fraction must be below 1"),
    ("open_set_holdout", 1.0, "open_set_holdout must be in"),
    ("min_images_per_class", 0, "min_images_per_class must be >= 1"),
])
def test_bad_caps_and_fractions_fail_before_decoding(tmp_path, data_config, field, value, match):
    data_config.root = str(tmp_path / "missing")  # never scanned: the check comes first
    data_config[field] = value
    with pytest.raises(ConfigError, match=match):
        prepare_data(data_config)


def test_fewer_than_two_training_classes_is_a_data_error(image_folder, data_config):
    root, _ = image_folder({"a": 5, "b": 1}, size=(4, 4))
    data_config.root = root
    with pytest.raises(DataError, match=r"at least 2 classes with >= 2 images .* only 1 of the 2"):
        prepare_data(data_config)


def _script():
    spec = importlib.util.spec_from_file_location(
        "prepare_data_script", os.path.join(ROOT, "scripts", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_script(image_folder, tmp_path, capsys):
    root, _ = image_folder({"a": 3, "b": 3})
    config = tmp_path / "cfg.py"
    config.write_text(
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location("
        f"'c', {os.path.join(ROOT, 'configs', 'common.py')!r})\n"
        "common = importlib.util.module_from_spec(spec); spec.loader.exec_module(common)\n"
        "def get_config():\n"
        "    c = common.base()\n"
        "    c.data.decode_workers = 1\n"
        "    return c\n")
    main = _script().main
    argv = ["--config", str(config), f"--config.data.root={root}", "--config.data.image_size=8",
            f"--config.data.cache_dir={tmp_path / 'cache'}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "decoded 6 images" in out and "2 training classes" in out
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, argv[:3] + ["--config.data.root=" + str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    assert "image folder not found" in capsys.readouterr().err


def test_data_change_says_what_changed():
    from facejax.data.prepare import data_change

    then = dict(images=10, classes=2, files="f", pixels="p", root="/a")
    assert data_change(then, dict(then, root="/b")) == ""  # moved: the same data
    assert data_change(then, {}) == data_change({}, then) == ""  # older runs: nothing to compare
    assert data_change(then, dict(then, images=12, files="g", pixels="q")) == \
        "10 images in 2 classes then, 12 images in 2 classes now"
    assert "but other file names or labels" in data_change(then, dict(then, files="g"))
    assert data_change(then, dict(then, pixels="q", root="/b")) == (
        "the same 10 file names and labels, but other pixels (images replaced or edited); "
        "the root was /a, now /b")


def test_prepared_data_carries_its_data_id(image_folder, data_config):
    root, _ = image_folder({"a": 3, "b": 3})
    data_config.root = root
    data = prepare_data(data_config)
    assert data.data_id["images"] == 6 and data.data_id["root"] == root
    assert len(data.data_id["pixels"]) == len(data.data_id["files"]) == 64


def test_small_classes_split_by_exact_counts_and_summary_shows_them(image_folder, data_config,
                                                                    tmp_path, capsys):
    # 10 images per person: each gets round(0.2 * 10) = 2 queries and 6 gallery (train) images.
    people = {f"person{k}": 10 for k in range(6)}
    root, _ = image_folder(people, size=(4, 4))
    data_config.root = root
    data = prepare_data(data_config)
    assert np.bincount(data.query.labels).tolist() == [2] * 6
    assert np.bincount(data.gallery.labels).tolist() == [6] * 6
    assert np.bincount(data.val.labels).tolist() == [2] * 6
    counts = data.class_counts()
    assert counts["queries"] == dict(min=2, median=2, max=2)
    assert counts["gallery"] == dict(min=6, median=6, max=6)
    summary = data.summary()
    assert "per class (6): queries 2 / 2 / 2, gallery 6 / 6 / 6 (min / median / max)" in summary
    assert "person3: 2 queries, 6 gallery" in summary
    # A run's config from before the setting keeps its (hash-threshold) split.
    del data_config["exact_counts_below"]
    old = prepare_data(data_config)
    assert np.bincount(old.query.labels, minlength=6).tolist() != [2] * 6
    # prepare_data.py prints the same lines.
    config = tmp_path / "cfg.py"
    config.write_text(
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location("
        f"'c', {os.path.join(ROOT, 'configs', 'common.py')!r})\n"
        "common = importlib.util.module_from_spec(spec); spec.loader.exec_module(common)\n"
        "def get_config():\n"
        "    c = common.base()\n"
        "    c.data.decode_workers = 1\n"
        "    return c\n")
    capsys.readouterr()
    assert _script().main(["--config", str(config), f"--config.data.root={root}",
                           "--config.data.image_size=8",
                           f"--config.data.cache_dir={tmp_path / 'cache2'}"]) == 0
    assert "per class (6): queries 2 / 2 / 2" in capsys.readouterr().out
    data_config.exact_counts_below = -3
    with pytest.raises(ConfigError, match="exact_counts_below"):
        prepare_data(data_config)
