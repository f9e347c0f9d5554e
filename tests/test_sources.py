"""Scanning class folders, the competition layout, idx files and tfds datasets."""

import os
import shutil
import subprocess

import numpy as np
import pytest
from conftest import make_tiny_tfds, write_idx
from PIL import Image

from facejax.data import sources
from facejax.data.sources import (
    FASHION_MNIST_CLASSES,
    load_idx,
    scan_competition,
    scan_folder,
    scan_idx,
    scan_tfds,
)
from facejax.errors import DataError


def _touch_image(path, colour=(1, 2, 3)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".pgm": "PPM",
           ".webp": "WEBP"}[os.path.splitext(path)[1].lower()]
    image = Image.new("L" if fmt == "PPM" else "RGB", (4, 4), colour[0] if fmt == "PPM" else colour)
    image.save(path, format=fmt)


def test_scan_folder_labels_extensions_and_hidden_files(tmp_path):
    root = tmp_path / "data"
    for rel in ["zebra/a.JPG", "zebra/b.Png", "zebra/nested/c.jpeg", "ant/x.bmp", "ant/y.pgm",
                "ant/z.WEBP", "ant/.hidden.jpg", "ant/._resource.jpg", ".cache/q.jpg"]:
        _touch_image(str(root / rel))
    (root / "ant" / "notes.txt").write_text("x")
    (root / "ant" / ".DS_Store").write_text("x")
    (root / "empty_class").mkdir()
    _touch_image(str(root / "loose.jpg"))

    listing = scan_folder(str(root))
    assert listing.class_names == ["ant", "zebra"]  # sorted; empty and hidden ones left out
    assert listing.paths == ["ant/x.bmp", "ant/y.pgm", "ant/z.WEBP",
                             "zebra/a.JPG", "zebra/b.Png", "zebra/nested/c.jpeg"]
    assert listing.labels.dtype == np.int32 and listing.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(listing.skipped) == [("ant/notes.txt", "not an image extension"),
                                       ("empty_class/", "empty class folder"),
                                       ("loose.jpg", "not in a class folder")]
    assert listing.root == str(root) and listing.kind == "files"


def test_scan_folder_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_folder(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="set --config.data.root"):
        scan_folder("")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        scan_folder(str(tmp_path / "empty"))


def test_listing_subset_keeps_rows_aligned(image_folder):
    root, _ = image_folder({"a": 3, "b": 2})
    listing = scan_folder(root)
    sub = listing.subset([4, 0])
    assert sub.paths == ["b/b_001.png", "a/a_000.png"] and sub.labels.tolist() == [1, 0]
    assert sub.class_names == listing.class_names


def test_scan_competition_flat_query_and_labelled_gallery(tmp_path):
    root = tmp_path / "comp"
    for rel in ["training/cat/1.jpg", "training/cat/2.jpg", "training/dog/1.jpg",
                "query/q1.jpg", "query/q0.png",
                "gallery/dog/g1.jpg", "gallery/emu/g2.jpg", "gallery/cat/g3.jpg"]:
        _touch_image(str(root / rel))
    comp = scan_competition(str(root))
    assert comp.training.paths == ["training/cat/1.jpg", "training/cat/2.jpg", "training/dog/1.jpg"]
    assert comp.training.class_names == ["cat", "dog"] and comp.training.root == str(root)
    assert comp.identity_names == ["cat", "dog", "emu"]  # training first, then new names
    assert comp.query.paths == ["query/q0.png", "query/q1.jpg"]
    assert comp.query.labels.tolist() == [-1, -1]
    assert comp.gallery.paths == ["gallery/cat/g3.jpg", "gallery/dog/g1.jpg", "gallery/emu/g2.jpg"]
    assert comp.gallery.labels.tolist() == [0, 1, 2]


def test_scan_competition_requires_all_three_folders(tmp_path):
    _touch_image(str(tmp_path / "training/cat/1.jpg"))
    _touch_image(str(tmp_path / "query/1.jpg"))
    with pytest.raises(DataError, match="gallery"):
        scan_competition(str(tmp_path))
    (tmp_path / "gallery").mkdir()
    with pytest.raises(DataError, match="gallery/ folder has no images"):
        scan_competition(str(tmp_path))
    shutil.rmtree(tmp_path / "training")
    with pytest.raises(DataError, match="no training/ folder"):
        scan_competition(str(tmp_path))


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 3, 9, 1, 1, 2, 0], np.uint8)
    write_idx(tmp_path, images, labels, split="test", gz=gz)
    got_images, got_labels = load_idx(str(tmp_path), "test")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int32 and got_labels.tolist() == labels.tolist()
    with pytest.raises(DataError, match="no train images idx file"):
        load_idx(str(tmp_path), "train")
    with pytest.raises(DataError, match="idx split must be one of"):
        load_idx(str(tmp_path), "validation")


def test_scan_idx_names_paths_and_ids(tmp_path):
    directory = tmp_path / "fashion-mnist"
    write_idx(directory, np.zeros((12, 28, 28), np.uint8), np.arange(12) % 10)
    listing = scan_idx(str(directory), "train")
    assert listing.kind == "idx" and listing.origin == ("train",)
    assert listing.class_names == FASHION_MNIST_CLASSES
    assert listing.paths[:2] == ["train/00", "train/01"] and listing.ids.tolist() == list(range(12))
    write_idx(tmp_path / "digits", np.zeros((3, 28, 28), np.uint8), [0, 1, 2])
    assert scan_idx(str(tmp_path / "digits")).class_names == ["0", "1", "2"]


def test_idx_corruption_is_a_data_error(tmp_path):
    write_idx(tmp_path, np.zeros((4, 5, 5), np.uint8), [0, 1, 0, 1], gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    data = images.read_bytes()
    images.write_bytes(b"\x00\x00\x09\x03" + data[4:])  # wrong dtype code
    with pytest.raises(DataError, match="not an idx3 ubyte file"):
        load_idx(str(tmp_path))
    images.write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_idx(str(tmp_path))
    write_idx(tmp_path, np.zeros((4, 5, 5), np.uint8), [0, 1, 0], gz=False)
    with pytest.raises(DataError, match="disagree"):
        load_idx(str(tmp_path))
    with pytest.raises(DataError, match="disagree"):
        scan_idx(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read idx file"):
        load_idx(str(tmp_path))


def test_ensure_fashion_mnist_finds_installs_or_explains(tmp_path, monkeypatch):
    present = tmp_path / "present"
    write_idx(present, np.zeros((2, 28, 28), np.uint8), [0, 1])
    assert sources.ensure_fashion_mnist(str(present)) == str(present)
    with pytest.raises(DataError, match="no Fashion-MNIST idx files in"):
        sources.ensure_fashion_mnist(str(tmp_path / "elsewhere"))

    package_dir = tmp_path / "usr-share-fashion-mnist"
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(package_dir))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DataError, match="sudo apt-get install -y dataset-fashion-mnist"):
        sources.ensure_fashion_mnist()

    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[1:])
        if cmd[1] == "install" and len(calls) == 3:  # works only after `apt-get update`
            write_idx(package_dir, np.zeros((2, 28, 28), np.uint8), [0, 1])
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert sources.ensure_fashion_mnist() == str(package_dir)
    assert calls == [["install", "-y", "dataset-fashion-mnist"], ["update"],
                     ["install", "-y", "dataset-fashion-mnist"]]


def test_tfds_real_array_record_dataset(tmp_path):
    name = make_tiny_tfds(tmp_path / "tfds", {"b": 2, "a": 3})
    listing = scan_tfds(name, "train", str(tmp_path / "tfds"))
    assert listing.kind == "tfds" and listing.class_names == ["a", "b"]
    assert sorted(listing.labels.tolist()) == [0, 0, 0, 1, 1]
    assert listing.paths == ["train/0", "train/1", "train/2", "train/3", "train/4"]
    source = sources.tfds_source(name, "train", str(tmp_path / "tfds"))
    assert isinstance(source[0]["image"], bytes)  # left encoded: decoded by our decoder
    assert source[0]["image"][:4] == b"\x89PNG"


def test_tfds_missing_dataset_or_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not available as a prepared array_record dataset"):
        sources.tfds_source("facejax_no_such_dataset", "train", str(tmp_path))
    name = make_tiny_tfds(tmp_path / "tfds", {"a": 1})
    with pytest.raises(DataError, match="split 'test'"):
        sources.tfds_source(name, "test", str(tmp_path / "tfds"))


def test_scan_tfds_accepts_any_data_source_like_object():
    class Fake:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": np.zeros((2, 2, 3), np.uint8), "label": [2, 0, 2][i]}

    listing = scan_tfds("fake", "train", "", source=Fake())
    assert listing.labels.tolist() == [2, 0, 2] and listing.class_names == ["0", "1", "2"]
