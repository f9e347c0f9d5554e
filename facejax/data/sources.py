"""Where images come from: class folders, the competition layout, idx files and tfds datasets."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np

from facejax.errors import DataError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".webp"})
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
COMPETITION_PARTS = ("training", "query", "gallery")


@dataclasses.dataclass(frozen=True)
class Listing:
    """Images found by a scan, before decoding.

    `paths` are relative to `root` ('/'-separated) and identify each image everywhere
    (splits hash them, the evaluator writes them). `labels[i]` indexes `class_names`
    (-1 = unlabelled). For kind 'idx' and 'tfds' there are no files: `ids[i]` is the record
    index and `origin` names the record source ((split,) or (name, split, data_dir)).
    """
    root: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    kind: str = "files"
    ids: np.ndarray | None = None
    origin: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Listing:
        rows = np.asarray(rows, np.int64)
        return dataclasses.replace(
            self, paths=[self.paths[r] for r in rows], labels=self.labels[rows],
            ids=None if self.ids is None else self.ids[rows])


@dataclasses.dataclass(frozen=True)
class Competition:
    """The competition layout: `training/` class folders plus `query/` and `gallery/`.

    Query and gallery labels index `identity_names` (training classes first, then names that
    only appear in query/gallery sub-folders); flat files there are unlabelled (-1).
    """
    training: Listing
    query: Listing
    gallery: Listing
    identity_names: list[str]


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _rel(root: str, path: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def _require_dir(path: str, what: str) -> None:
    if not path:
        raise DataError(f"no {what} given: set --config.data.root=/path/to/images")
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}")
    if not os.path.isdir(path):
        raise DataError(f"{what} is not a folder: {path}")


def _walk_images(root: str, top: str) -> tuple[list[str], list[tuple[str, str]]]:
    """All image files under `top` (recursively, sorted), as paths relative to `root`."""
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            rel = _rel(root, os.path.join(dirpath, name))
            if _is_image(name):
                found.append(rel)
            else:
                skipped.append((rel, "not an image extension"))
    return found, skipped


def _class_dirs(top: str) -> tuple[list[str], list[str]]:
    """Sorted visible sub-folder names and loose (image) file names directly under `top`."""
    with os.scandir(top) as it:
        entries = [e for e in it if not _is_hidden(e.name)]
    dirs = sorted(e.name for e in entries if e.is_dir())
    files = sorted(e.name for e in entries if not e.is_dir() and _is_image(e.name))
    return dirs, files


def scan_folder(root: str, *, _rel_root: str | None = None) -> Listing:
    """One sub-folder per class (searched recursively); labels follow sorted folder names.

    Extensions in IMAGE_EXTS count in any letter case; hidden files and folders are ignored.
    Other files, loose images beside the class folders and empty class folders are reported
    in `skipped`, and an empty class folder gets no label.
    """
    _require_dir(root, "image folder")
    base = root if _rel_root is None else _rel_root
    dirs, loose = _class_dirs(root)
    skipped = [(_rel(base, os.path.join(root, f)), "not in a class folder") for f in loose]
    paths, labels, class_names = [], [], []
    for d in dirs:
        files, bad = _walk_images(base, os.path.join(root, d))
        skipped += bad
        if not files:
            skipped.append((_rel(base, os.path.join(root, d)) + "/", "empty class folder"))
            continue
        paths += files
        labels += [len(class_names)] * len(files)
        class_names.append(d)
    if not paths:
        raise DataError(f"no images found under {root}: expected one sub-folder per class, "
                        f"e.g. {root}/<class>/<image>.jpg (extensions: "
                        f"{', '.join(sorted(IMAGE_EXTS))})")
    return Listing(base, paths, np.asarray(labels, np.int32), class_names, skipped)


def _scan_eval_part(root: str, part: str) -> tuple[list[str], list[str | None], list]:
    """query/ or gallery/: loose files are unlabelled, sub-folders are identities."""
    top = os.path.join(root, part)
    _require_dir(top, f"competition {part}/ folder")
    dirs, loose = _class_dirs(top)
    paths = [_rel(root, os.path.join(top, f)) for f in loose]
    names: list[str | None] = [None] * len(paths)
    skipped = []
    for d in dirs:
        files, bad = _walk_images(root, os.path.join(top, d))
        skipped += bad
        if not files:
            skipped.append((_rel(root, os.path.join(top, d)) + "/", "empty class folder"))
        paths += files
        names += [d] * len(files)
    if not paths:
        raise DataError(f"competition {part}/ folder has no images: {top}")
    return paths, names, skipped


def scan_competition(root: str) -> Competition:
    """`root/training/<class>/*`, plus `root/query/` and `root/gallery/` (flat or class folders).

    All paths are relative to `root` (e.g. 'query/0001.jpg'), so results can be written back as
    query -> top-k gallery file names.
    """
    _require_dir(root, "competition folder")
    training = scan_folder(os.path.join(root, "training"), _rel_root=root) \
        if os.path.isdir(os.path.join(root, "training")) else None
    if training is None:
        raise DataError(f"competition folder {root} has no training/ folder "
                        f"(expected {', '.join(p + '/' for p in COMPETITION_PARTS)})")
    parts = {p: _scan_eval_part(root, p) for p in ("query", "gallery")}
    extra = sorted({n for _, names, _ in parts.values() for n in names if n is not None}
                   - set(training.class_names))
    identity_names = list(training.class_names) + extra
    index = {n: i for i, n in enumerate(identity_names)}
    listings = {}
    for part, (paths, names, skipped) in parts.items():
        labels = np.asarray([-1 if n is None else index[n] for n in names], np.int32)
        listings[part] = Listing(root, paths, labels, identity_names, skipped)
    return Competition(training, listings["query"], listings["gallery"], identity_names)


# ----------------------------------------------------------------------------- idx files

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08


def _idx_file(directory: str, split: str, kind: str) -> str:
    if split not in _IDX_PREFIX:
        raise DataError(f"idx split must be one of {sorted(_IDX_PREFIX)}, got {split!r}")
    ndim = 3 if kind == "images" else 1
    prefix = _IDX_PREFIX[split]
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        for ext in (".gz", ""):
            path = os.path.join(directory, stem + ext)
            if os.path.isfile(path):
                return path
    raise DataError(f"no {split} {kind} idx file in {directory} "
                    f"(expected {prefix}-{kind}-idx{ndim}-ubyte[.gz])")


def _open_idx(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _idx_header(f, path: str, ndim: int) -> tuple[int, ...]:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != _IDX_UBYTE or head[3] != ndim:
        raise DataError(f"{path} is not an idx{ndim} ubyte file (magic bytes "
                        f"{head.hex() or 'missing'}, expected 0000080{ndim})")
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"{path}: idx header is truncated")
    return tuple(int(d) for d in np.frombuffer(dims, ">u4"))


def _read_idx(path: str, ndim: int, header_only: bool = False) -> np.ndarray | tuple[int, ...]:
    try:
        with _open_idx(path) as f:
            shape = _idx_header(f, path, ndim)
            if header_only:
                return shape
            data = f.read()
    except (OSError, EOFError) as e:  # bad gzip stream, unreadable file
        raise DataError(f"cannot read idx file {path}: {e}") from None
    count = int(np.prod(shape))
    if len(data) < count:
        raise DataError(f"{path} is truncated: {len(data)} bytes of pixel data, expected {count}")
    return np.frombuffer(data, np.uint8, count).reshape(shape)


def load_idx(directory: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Reads MNIST-style idx files: (images uint8 [N,H,W], labels int32 [N]).

    `split` 'train' reads train-*-ubyte[.gz], 'test' reads t10k-*-ubyte[.gz].
    """
    _require_dir(directory, "idx folder")
    images_path = _idx_file(directory, split, "images")
    labels_path = _idx_file(directory, split, "labels")
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"idx files disagree: {len(images)} images in {images_path} but "
                        f"{len(labels)} labels in {labels_path}")
    return images, labels.astype(np.int32)


def idx_files(directory: str, split: str) -> list[str]:
    """The two files a split reads (their sizes and mtimes key the cache)."""
    return [_idx_file(directory, split, "images"), _idx_file(directory, split, "labels")]


def scan_idx(directory: str, split: str = "train") -> Listing:
    """A Listing over an idx split (reads the labels; images are read when caching)."""
    _require_dir(directory, "idx folder")
    images_path, labels_path = idx_files(directory, split)
    shape = _read_idx(images_path, 3, header_only=True)
    labels = _read_idx(labels_path, 1).astype(np.int32)
    if shape[0] != len(labels):
        raise DataError(f"idx files disagree: {shape[0]} images in {images_path} but "
                        f"{len(labels)} labels in {labels_path}")
    num = int(labels.max()) + 1 if len(labels) else 0
    # Fashion-MNIST is the built-in dataset; other idx sets (e.g. MNIST digits) get numbers.
    fashion = "fashion" in os.path.basename(os.path.abspath(directory)).lower() and num <= 10
    names = FASHION_MNIST_CLASSES[:num] if fashion else [str(i) for i in range(num)]
    width = len(str(max(len(labels) - 1, 0)))
    paths = [f"{split}/{i:0{width}d}" for i in range(len(labels))]
    return Listing(directory, paths, labels, names, [], kind="idx",
                   ids=np.arange(len(labels), dtype=np.int64), origin=(split,))


def _has_idx(directory: str) -> bool:
    try:
        idx_files(directory, "train")
        return True
    except DataError:
        return False


def ensure_fashion_mnist(directory: str | None = None) -> str:
    """Returns the Fashion-MNIST idx folder (default: the Debian package's), installing the
    package when it can.

    It runs `apt-get install -y dataset-fashion-mnist` only for the package's own folder, as
    root, with apt-get available; otherwise it raises DataError saying what to run.
    """
    directory = directory or FASHION_MNIST_DIR
    if _has_idx(directory):
        return directory
    how = (f"install it with `sudo apt-get install -y {FASHION_MNIST_PACKAGE}` (Debian/Ubuntu), "
           f"or set --config.data.root to a folder holding train-images-idx3-ubyte.gz and "
           f"train-labels-idx1-ubyte.gz")
    if directory != FASHION_MNIST_DIR:
        raise DataError(f"no Fashion-MNIST idx files in {directory}; {how}")
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise DataError(f"Fashion-MNIST is not installed ({directory} is missing); {how}")
    print(f"Fashion-MNIST not found; running: apt-get install -y {FASHION_MNIST_PACKAGE}",
          flush=True)
    for cmd in ([apt, "install", "-y", FASHION_MNIST_PACKAGE],
                [apt, "update"], [apt, "install", "-y", FASHION_MNIST_PACKAGE]):
        subprocess.run(cmd, check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if cmd[1] == "install" and _has_idx(directory):
            return directory
    raise DataError(f"`apt-get install -y {FASHION_MNIST_PACKAGE}` did not provide {directory}; "
                    f"{how}")


# ----------------------------------------------------------------------------- tfds

def tfds_source(name: str, split: str = "train", data_dir: str = "", *,
                decode_images: bool = False):
    """`tfds.data_source` over an already prepared (array_record) dataset; never downloads.

    With `decode_images=False` the 'image' feature stays encoded bytes, so scanning labels is
    cheap and decoding goes through `decode.decode_bytes` like any file. TensorFlow is not used.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("source=tfds needs tensorflow-datasets: "
                        "pip install tensorflow-datasets") from None
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")

    def open_source(decoders):
        try:
            return tfds.data_source(name, split=split, data_dir=data_dir or None,
                                    download=False, decoders=decoders)
        except Exception as e:  # noqa: BLE001 - tfds raises assorted types when data is missing
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"tfds dataset {name!r} split {split!r} is not available as a prepared "
                            f"array_record dataset under {where}: {first}") from None

    source = open_source(None)
    features = source.dataset_info.features
    missing = [k for k in ("image", "label") if k not in features]
    if missing:
        raise DataError(f"tfds dataset {name!r} has no {' or '.join(map(repr, missing))} feature "
                        f"(features: {', '.join(features.keys())})")
    if not decode_images and isinstance(features["image"], tfds.features.Image):
        source = open_source({"image": tfds.decode.SkipDecoding()})
    return source


def scan_tfds(name: str, split: str = "train", data_dir: str = "",
              source=None) -> Listing:
    """A Listing over a tfds split; `source` (anything with len() and [i] -> {'label': ...})
    replaces the real `tfds_source` when given."""
    if source is None:
        source = tfds_source(name, split, data_dir)
    n = len(source)
    if n == 0:
        raise DataError(f"tfds dataset {name!r} split {split!r} is empty")
    getitems = getattr(source, "__getitems__", None)
    labels = np.empty(n, np.int32)
    for start in range(0, n, 1024):
        rows = range(start, min(n, start + 1024))
        items = getitems(list(rows)) if getitems else [source[i] for i in rows]
        labels[start:start + len(items)] = [int(it["label"]) for it in items]
    info = getattr(source, "dataset_info", None)
    label_feature = info.features["label"] if info is not None else None
    names = list(getattr(label_feature, "names", None) or [])
    if not names:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    root = str(getattr(info, "data_dir", "") or data_dir or f"tfds:{name}")
    width = len(str(n - 1))
    paths = [f"{split}/{i:0{width}d}" for i in range(n)]
    return Listing(root, paths, labels, names, [], kind="tfds",
                   ids=np.arange(n, dtype=np.int64), origin=(name, split, data_dir))
