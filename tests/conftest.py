"""Shared test set-up: CPU-only JAX, caches in a temp folder, and tiny synthetic image folders."""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import shutil
import tempfile
import types
from typing import ClassVar

# Before anything imports jax/keras: run on the CPU and keep every cache out of the home folder.
_TMP = tempfile.mkdtemp(prefix="facejax-tests-")
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["KERAS_HOME"] = os.path.join(_TMP, "keras")
os.environ["TORCH_HOME"] = os.path.join(_TMP, "torch")
os.environ["FACEJAX_CACHE"] = os.path.join(_TMP, "facejax-cache")
os.environ["FACEJAX_WEIGHTS"] = os.path.join(_TMP, "weights")
os.environ["TFDS_DATA_DIR"] = os.path.join(_TMP, "tfds")
os.environ["MPLBACKEND"] = "Agg"

import numpy as np
import pytest
from PIL import Image


class LazyModule(types.ModuleType):
    """Module `name`, imported at its first attribute access; whether it is installed is checked
    at once (a missing extra must fail, not skip). A test file's module-level import runs at
    collection even when -m deselects every test that uses it: torchvision's pulls in
    torch._dynamo, a quarter of the fast tier's collection time."""

    def __init__(self, name: str):
        super().__init__(name)
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"No module named {name!r}")

    def __getattr__(self, attr):
        if attr.startswith("_"):  # pytest's collection probes every module global for markers
            raise AttributeError(attr)
        return getattr(importlib.import_module(self.__name__), attr)


def class_colour(k: int) -> tuple[int, int, int]:
    """A distinct, well separated RGB colour per class index (tests read labels back from it)."""
    return ((50 + 97 * k) % 256, (200 + 61 * k) % 256, (20 + 151 * k) % 256)


def write_image_folder(root, counts: dict[str, int], *, size=(12, 10), ext: str = ".png",
                       seed: int = 0) -> dict[str, tuple[int, int, int]]:
    """Writes `root/<class>/<class>_<i><ext>`: `counts[class]` images of `size` (w, h) each.

    Every image is its class colour (classes numbered in sorted order) plus +-3 noise, so a
    decoded pixel tells its class. Returns {relative path: class colour}.
    """
    rng = np.random.default_rng(seed)
    written = {}
    for k, name in enumerate(sorted(counts)):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        colour = np.array(class_colour(k), np.int16)
        for i in range(counts[name]):
            noise = rng.integers(-3, 4, (size[1], size[0], 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            rel = f"{name}/{name}_{i:03d}{ext}"
            Image.fromarray(pixels).save(os.path.join(root, rel), quality=95)
            written[rel] = class_colour(k)
    return written


@pytest.fixture
def image_folder(tmp_path):
    """Factory: image_folder({'a': 3, 'b': 2}, **kw) -> (root, {relpath: colour}) in tmp_path."""
    def make(counts: dict[str, int], name: str = "images", **kw):
        root = os.path.join(tmp_path, name)
        os.makedirs(root, exist_ok=True)
        return root, write_image_folder(root, counts, **kw)
    return make


def load_common_configs():
    """The config schema module (`facejax.config_schema`, which configs/common.py re-exports)."""
    from facejax import config_schema

    return config_schema


@pytest.fixture
def data_config(tmp_path):
    """The schema's data block, pointed at a per-test cache, with in-process decoding."""
    cfg = load_common_configs().data()
    cfg.cache_dir = os.path.join(tmp_path, "cache")
    cfg.decode_workers = 1
    cfg.image_size = 16
    return cfg


# The bad-input corpus: files a real folder of photos contains sooner or later.
CORPUS_MAX_PIXELS = 5_000  # corpus images are <= 40x30; "huge.png" is 100x80
CORPUS_GOOD = {  # file -> the colour its decoded pixels must have (None: checked separately)
    "rgb.jpg": (200, 30, 60),
    "upper_case.JPEG": (200, 30, 60),
    "gray.png": (128, 128, 128),
    "gray.pgm": (90, 90, 90),
    "bilevel.bmp": (255, 255, 255),
    "rgb.webp": (10, 220, 40),
    "palette.png": (0, 0, 255),
    "palette_transparent.png": (0, 0, 0),
    "la.png": (100, 100, 100),  # L=200 at alpha 128, composited on black
    "rgba.png": None,            # left half opaque red, right half transparent white
    "cmyk.jpg": (255, 0, 0),
    "gray16.png": (200, 200, 200),  # 51400 / 257
    "exif_rotated.jpg": None,    # 40x20 landscape, red|blue, orientation 6 (rotate 90 CW)
}
CORPUS_BAD = {  # file -> skip reason
    "truncated.jpg": "truncated",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "huge.png": "too large",
}


def write_corpus(directory) -> list[str]:
    """Writes every CORPUS_GOOD and CORPUS_BAD file into `directory`; returns the names."""
    os.makedirs(directory, exist_ok=True)

    def path(name):
        return os.path.join(directory, name)

    def solid(colour, mode="RGB", size=(12, 10)):
        return Image.new(mode, size, colour)

    solid((200, 30, 60)).save(path("rgb.jpg"), quality=95)
    solid((200, 30, 60)).save(path("upper_case.JPEG"), format="JPEG", quality=95)
    solid(128, "L").save(path("gray.png"))
    solid(90, "L").save(path("gray.pgm"))
    solid(1, "1").save(path("bilevel.bmp"))
    solid((10, 220, 40)).save(path("rgb.webp"), lossless=True)
    solid((0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE).save(path("palette.png"))
    pal = Image.new("P", (12, 10), 1)
    pal.putpalette([0, 255, 0, 255, 0, 255] + [0] * 762)
    pal.save(path("palette_transparent.png"), transparency=1)  # all pixels transparent magenta
    solid((200, 128), "LA").save(path("la.png"))
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[:, :6] = (255, 0, 0, 255)
    rgba[:, 6:] = (255, 255, 255, 0)
    Image.fromarray(rgba, "RGBA").save(path("rgba.png"))
    solid((0, 255, 255, 0), "CMYK").save(path("cmyk.jpg"), quality=95)
    Image.fromarray(np.full((10, 12), 51400, np.uint16)).save(path("gray16.png"))
    land = np.zeros((20, 40, 3), np.uint8)
    land[:, :20] = (255, 0, 0)
    land[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(land).save(path("exif_rotated.jpg"), quality=95, exif=exif.tobytes())

    noisy = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path("truncated.jpg"), quality=90)
    with open(path("truncated.jpg"), "rb") as f:
        data = f.read()
    with open(path("truncated.jpg"), "wb") as f:
        f.write(data[: len(data) * 6 // 10])
    open(path("empty.jpg"), "wb").close()
    with open(path("text.jpg"), "w") as f:
        f.write("this is not a picture\n" * 20)
    solid((5, 5, 5), size=(100, 80)).save(path("huge.png"))
    return sorted(CORPUS_GOOD) + sorted(CORPUS_BAD)


def write_idx(directory, images: np.ndarray, labels: np.ndarray, split: str = "train",
              gz: bool = True) -> None:
    """Writes MNIST-style idx files (`train-*` or `t10k-*`, gzipped or raw)."""
    import gzip
    import struct

    os.makedirs(directory, exist_ok=True)
    prefix = "t10k" if split == "test" else "train"
    for kind, array in (("images", images), ("labels", labels)):
        array = np.asarray(array, np.uint8)
        header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        name = f"{prefix}-{kind}-idx{array.ndim}-ubyte" + (".gz" if gz else "")
        opener = gzip.open if gz else open
        with opener(os.path.join(directory, name), "wb") as f:
            f.write(header + array.tobytes())


_TINY_TFDS = {}


def make_tiny_tfds(data_dir, counts: dict[str, int], size=(10, 8)) -> str:
    """Prepares a real array_record tfds dataset ('facejax_tiny_faces', split 'train') under
    `data_dir` without TensorFlow: images are given to tfds already PNG-encoded. Each image is
    its class colour (class_colour of the sorted class index). Returns the dataset name."""
    import io

    import tensorflow_datasets as tfds

    names = sorted(counts)
    if "builder" not in _TINY_TFDS:
        class FacejaxTinyFaces(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            spec: ClassVar[dict] = {}

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=self.spec["names"])}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                key = 0
                for k, name in enumerate(self.spec["names"]):
                    for _ in range(self.spec["counts"][name]):
                        buf = io.BytesIO()
                        Image.new("RGB", self.spec["size"], class_colour(k)).save(buf, "PNG")
                        yield key, {"image": buf.getvalue(), "label": k}
                        key += 1

        _TINY_TFDS["builder"] = FacejaxTinyFaces
    builder_cls = _TINY_TFDS["builder"]
    builder_cls.spec = {"names": names, "counts": counts, "size": size}
    builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return "facejax_tiny_faces"


def colour_embedder(params, images_u8):
    """Mean colour, centred and L2-normalised: classes of distinct colours separate cleanly."""
    import jax.numpy as jnp

    x = images_u8.astype(jnp.float32).mean(axis=(1, 2)) / 255.0 - params["centre"]
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def make_run(tmp_path, root, source="folder", centre=(0.5, 0.5, 0.5)):
    """A run folder (config.json, plots/, an exported `colour_embedder`) over `root`, no
    training: the retrieval and serving steps run on it as on a trained run."""
    from facejax.config import to_json
    from facejax.retrieval import embed

    cfg = load_common_configs().base()
    cfg.data.source, cfg.data.root = source, root
    cfg.data.image_size, cfg.data.decode_workers = 16, 1
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.val_fraction = 0.34
    cfg.eval.ks = (1, 3)
    cfg.eval.num_figure_queries = 3
    work = tmp_path / f"run_{source}"
    (work / "plots").mkdir(parents=True)
    (work / "config.json").write_text(to_json(cfg))
    Image.new("RGB", (40, 30), (255, 255, 255)).save(work / "plots" / "loss.png")
    meta = dict(model="colour", input_size=16, resize_mode="crop", normalization="unit")
    embed.export_embedder(colour_embedder, {"centre": np.array(centre, np.float32)}, meta,
                          str(work / "embedder"))
    return str(work)


def pytest_collection_finish(session):
    """The fast tier keeps a test of every facejax package (tests/_fast_tier.py)."""
    from pathlib import Path

    from tests._fast_tier import check

    check(session, Path(__file__).resolve().parent.parent / "facejax")


def pytest_terminal_summary(terminalreporter):
    from tests._fast_tier import summary

    summary(terminalreporter)
