"""Where images come from: class folders, the competition layout, idx files and tfds datasets."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import math
import os
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np

from facejax import limits, rundir
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


# A folder holding config.json and one of these is a facejax run folder (--workdir): its plots,
# reports and enrolled images are the run's output, never data, even inside the data root.
# lr_find.json marks scripts/lr_find.py's --workdir (its plot is no data either).
RUN_FOLDER_FILE = rundir.CONFIG_JSON
RUN_FOLDER_MARKERS = frozenset({rundir.CLASSES_JSON, rundir.CHECKPOINT_DIR, rundir.EMBEDDER_DIR,
                                rundir.METRICS_JSONL})
LR_FIND_FILE = "lr_find.json"
RUN_FOLDER_REASON = "a facejax run folder (--workdir), not data"
DUPLICATE_REASON = "duplicate: a link to another listed file (counted once)"
LINKED_FOLDER_REASON = "symlinked folder inside a class folder (not followed)"


def _is_run(names: set[str]) -> bool:
    return (RUN_FOLDER_FILE in names and bool(names & RUN_FOLDER_MARKERS)) or \
        LR_FIND_FILE in names


def is_run_folder(path: str) -> bool:
    """Whether `path` is a facejax run folder (config.json beside classes.json, checkpoints/,
    embedder/ or metrics.jsonl; or lr_find.json)."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return _is_run(names)


@dataclasses.dataclass
class _Group:
    """Image files found under one folder: `paths` relative to the scan's root, `real[i]` the
    resolved location of `paths[i]` (symlinks followed), which tells links apart. `name` is
    the class folder's name and `folder` its path relative to the root ('' for loose files)."""
    name: str | None
    folder: str
    paths: list[str]
    real: list[str]


def _walk_images(root: str, top: str) -> tuple[_Group, list[tuple[str, str]]]:
    """All image files under `top` (recursively, sorted as os.walk would), relative to `root`.

    Hidden entries are ignored; run folders, symlinked sub-folders (not followed, so a link
    loop cannot recurse), unreadable folders and non-image files are reported in `skipped`.
    """
    group = _Group(os.path.basename(top), _rel(root, top) + "/", [], [])
    skipped = []
    stack = [top]
    while stack:
        folder = stack.pop()
        rel_folder = _rel(root, folder) + "/"
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not _is_hidden(e.name)), key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel_folder, f"unreadable folder ({e.strerror or e})"))
            continue
        if _is_run({e.name for e in entries}):
            skipped.append((rel_folder, RUN_FOLDER_REASON))
            continue
        real_folder = os.path.realpath(folder)
        subfolders = []
        for e in entries:
            if e.is_dir():
                if e.is_symlink():
                    skipped.append((_rel(root, e.path) + "/", LINKED_FOLDER_REASON))
                else:
                    subfolders.append(e.path)
            elif _is_image(e.name):
                group.paths.append(_rel(root, e.path))
                group.real.append(os.path.realpath(e.path) if e.is_symlink()
                                  else os.path.join(real_folder, e.name))
            else:
                skipped.append((_rel(root, e.path), "not an image extension"))
        stack += reversed(subfolders)  # depth first, in name order
    return group, skipped


def _drop_duplicates(root: str, groups: list[_Group]) -> list[tuple[str, str]]:
    """Keeps one path per real file across `groups` (in place); reports the others.

    A symlinked class folder (`s8_alias -> s8`) or file would give one image two entries, or
    two labels. The copy kept is the one that lives where it is listed (no link on its path),
    else the first in scan order. A class folder left with no file is reported once.
    """
    real_root = os.path.realpath(root)
    owner: dict[str, tuple[int, int]] = {}
    dropped: set[tuple[int, int]] = set()

    def direct(g: int, i: int) -> bool:
        return os.path.normpath(os.path.join(real_root, groups[g].paths[i])) == groups[g].real[i]

    for g, group in enumerate(groups):
        for i, real in enumerate(group.real):
            first = owner.setdefault(real, (g, i))
            if first == (g, i):
                continue
            if direct(g, i) and not direct(*first):
                dropped.add(first)
                owner[real] = (g, i)
            else:
                dropped.add((g, i))
    skipped = []
    for g, group in enumerate(groups):
        gone = [i for i in range(len(group.paths)) if (g, i) in dropped]
        if gone and len(gone) == len(group.paths) and group.folder:
            kept_in = collections.Counter(groups[owner[group.real[i]][0]].folder or "./"
                                          for i in gone).most_common(1)[0][0]
            skipped.append((group.folder, f"same files as {kept_in} (links; counted once there)"))
        else:
            skipped += [(group.paths[i], DUPLICATE_REASON) for i in gone]
    for g, group in enumerate(groups):
        keep = [i for i in range(len(group.paths)) if (g, i) not in dropped]
        group.paths = [group.paths[i] for i in keep]
        group.real = [group.real[i] for i in keep]
    return skipped


def _class_dirs(top: str) -> tuple[list[str], list[str]]:
    """Sorted visible sub-folder names and loose (image) file names directly under `top`."""
    with os.scandir(top) as it:
        entries = [e for e in it if not _is_hidden(e.name)]
    dirs = sorted(e.name for e in entries if e.is_dir())
    files = sorted(e.name for e in entries if not e.is_dir() and _is_image(e.name))
    return dirs, files


def _refuse_run_folder(path: str, what: str) -> None:
    if is_run_folder(path):
        raise DataError(f"{what} {path} is a facejax run folder (a --workdir: it holds "
                        f"{RUN_FOLDER_FILE} and the run's files), not images: point "
                        f"--config.data.root at the image folder")


def _class_groups(base: str, top: str, loose: _Group | None = None
                  ) -> tuple[list[_Group], list[tuple[str, str]]]:
    """One group per visible sub-folder of `top` (its images, recursively), after `loose`
    (files directly in `top`, if given), with duplicates across all of them dropped. Class
    folders left without images are reported, not returned."""
    dirs, _ = _class_dirs(top)
    groups, skipped = [], []
    for d in dirs:
        group, bad = _walk_images(base, os.path.join(top, d))
        skipped += bad
        groups.append(group)
    skipped += _drop_duplicates(base, ([loose] if loose else []) + groups)
    reported = {p for p, _ in skipped}
    for group in groups:
        if not group.paths and group.folder not in reported:
            skipped.append((group.folder, "empty class folder"))
    return [g for g in groups if g.paths], skipped


def scan_folder(root: str, *, _rel_root: str | None = None) -> Listing:
    """One sub-folder per class (searched recursively); labels follow sorted folder names.

    Extensions in IMAGE_EXTS count in any letter case; hidden files and folders are ignored.
    Other files, loose images beside the class folders and empty class folders are reported
    in `skipped`, and an empty class folder gets no label. A file reached twice through
    symlinks (a linked class folder or file) is listed once, where it really lives, and the
    other paths are reported; a facejax run folder (a --workdir inside the data) is left out.
    """
    _require_dir(root, "image folder")
    _refuse_run_folder(root, "image folder")
    base = root if _rel_root is None else _rel_root
    _, loose = _class_dirs(root)
    skipped = [(_rel(base, os.path.join(root, f)), "not in a class folder") for f in loose]
    groups, bad = _class_groups(base, root)
    skipped += bad
    paths, labels, class_names = [], [], []
    for group in groups:
        paths += group.paths
        labels += [len(class_names)] * len(group.paths)
        class_names.append(group.name)
    if not paths:
        raise DataError(f"no images found under {root}: expected one sub-folder per class, "
                        f"e.g. {root}/<class>/<image>.jpg (extensions: "
                        f"{', '.join(sorted(IMAGE_EXTS))})")
    return Listing(base, paths, np.asarray(labels, np.int32), class_names, skipped)


def _scan_eval_part(root: str, part: str) -> tuple[list[str], list[str | None], list]:
    """query/ or gallery/: loose files are unlabelled, sub-folders are identities."""
    top = os.path.join(root, part)
    _require_dir(top, f"competition {part}/ folder")
    _, loose_names = _class_dirs(top)
    loose = _Group(None, "", [], [])
    for f in loose_names:
        full = os.path.join(top, f)
        loose.paths.append(_rel(root, full))
        loose.real.append(os.path.realpath(full))
    dirs, skipped = _class_groups(root, top, loose)
    paths, names = list(loose.paths), [None] * len(loose.paths)
    for group in dirs:
        paths += group.paths
        names += [group.name] * len(group.paths)
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
            count = math.prod(shape)
            # The header sets the size: check it before reading (a .gz can expand without end).
            limits.check_memory(count, f"the idx file {path} (shape {shape})",
                                "is the file damaged? Its header asks for that much",
                                error=DataError)
            data = f.read(count)
    except (OSError, EOFError) as e:  # bad gzip stream, unreadable file
        raise DataError(f"cannot read idx file {path}: {e}") from None
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
