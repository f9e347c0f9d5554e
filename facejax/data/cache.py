"""Decode a Listing once into a memory-mapped uint8 .npy [N, S, S, 3], keyed by a manifest hash.

A cache entry is a folder `<cache_dir>/<name>-<S><mode>[-box<t_l_b_r>]-<key>/` with images.npy,
rows.npy (listing rows kept), labels.npy, paths.json, skipped.json and manifest.json. The key
hashes the format version, decode settings (face_crop included) and every item's relative
path, label, size and mtime, so a rerun reuses the entry and any changed file gives a new one.
An entry is built in a hidden temporary folder and renamed into place, so a killed build never
leaves one that looks valid; one process at a time builds an entry (a second one asking for it
waits on a lock, `.<name>.lock`, then reuses the result). When a source changes (files added,
edited or removed), its new entry says how much the older entries of the same source and
settings hold; `prune=True` (`scripts/prepare_data.py --prune_cache`) deletes them. They are
not deleted unasked: a run still training on the old files reopens its entry by path in its
data workers. Removing the cache folder is always safe.

The manifest also records the entry's `content` (`content_identity`): counts, a hash of the
file names and labels, and a hash of the decoded pixels (each row's sha256, taken in the decode
worker). Unlike the key it ignores file times and the root, so a copied folder has the same
content; runs and indexes record it to notice changed data. A new entry must fit the free
disk and `max_cache_gb` before anything is written.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from facejax import limits
from facejax.atomic import write_file_atomic
from facejax.children import ExitWithParent
from facejax.data import decode, sources
from facejax.data.decode import BadImage
from facejax.data.sources import Listing
from facejax.errors import ConfigError, DataError
from facejax.runlock import hold_lock

FORMAT_VERSION = 1
_NPY_MAGIC = b"\x93NUMPY\x01\x00"


@dataclasses.dataclass(frozen=True)
class CachedImages:
    """A ready cache entry: `images[j]` is listing row `rows[j]`; failed rows are left out."""
    images: np.ndarray
    rows: np.ndarray
    skipped: list[tuple[str, str]]
    directory: str
    reused: bool
    content: dict | None = None  # the data's identity: see `content_identity`


def default_cache_dir(cache_dir: str = "") -> str:
    """data.cache_dir, else $FACEJAX_CACHE, else ~/.cache/facejax."""
    return os.path.expanduser(cache_dir or os.environ.get("FACEJAX_CACHE") or "~/.cache/facejax")


# ----------------------------------------------------------------------------- readers
# A reader turns listing row i into the cache format. It is pickled once into each worker
# process, so it carries names and settings, not pixels.

class _FileReader:
    parallel = True

    def __init__(self, listing: Listing, size: int, mode: str, max_pixels: int, face_crop):
        self.root, self.paths = listing.root, listing.paths
        self.size, self.mode, self.max_pixels = size, mode, max_pixels
        self.face_crop = face_crop

    def fingerprint(self):
        for p in self.paths:
            try:
                st = os.stat(os.path.join(self.root, p))
                yield f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                yield "missing"

    def __call__(self, i: int) -> np.ndarray:
        return decode.decode_image(os.path.join(self.root, self.paths[i]), self.size, self.mode,
                                   self.max_pixels, self.face_crop)


class _IdxReader:
    # 28x28 arrays resize in microseconds; a worker would spend longer re-reading the file.
    parallel = False

    def __init__(self, listing: Listing, size: int, mode: str, max_pixels: int, face_crop):
        self.directory, (self.split,) = listing.root, listing.origin
        self.ids, self.size, self.mode, self.face_crop = listing.ids, size, mode, face_crop
        self._images = None

    def fingerprint(self):
        for path in sources.idx_files(self.directory, self.split):
            st = os.stat(path)
            yield f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}"

    def __call__(self, i: int) -> np.ndarray:
        if self._images is None:
            self._images, _ = sources.load_idx(self.directory, self.split)
        return decode.fit_array(self._images[self.ids[i]], self.size, self.mode, self.face_crop)


class _TfdsReader:
    parallel = True

    def __init__(self, listing: Listing, size: int, mode: str, max_pixels: int, face_crop):
        self.name, self.split, self.data_dir = listing.origin
        self.ids, self.size, self.mode, self.max_pixels = listing.ids, size, mode, max_pixels
        self.face_crop = face_crop
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}  # each process opens its own data source

    def _open(self):
        if self._source is None:
            self._source = sources.tfds_source(self.name, self.split, self.data_dir)
        return self._source

    def fingerprint(self):
        source = self._open()
        info = getattr(source, "dataset_info", None)
        yield f"{getattr(info, 'full_name', self.name)}:{self.split}:{len(source)}"

    def __call__(self, i: int) -> np.ndarray:
        image = self._open()[int(self.ids[i])]["image"]
        if isinstance(image, bytes):
            return decode.decode_bytes(image, self.size, self.mode, self.max_pixels,
                                       self.face_crop)
        return decode.fit_array(np.asarray(image), self.size, self.mode, self.face_crop)


_READERS = {"files": _FileReader, "idx": _IdxReader, "tfds": _TfdsReader}

_worker_reader = None


def _init_worker(reader, exit_with_parent: ExitWithParent) -> None:
    global _worker_reader
    _worker_reader = reader
    exit_with_parent()  # a kill -9 of the parent must not leave the decoders running


def _read(reader, i: int):
    """(row, image, digest, reason, detail): the row's sha256 is taken here, in the worker."""
    try:
        image = np.ascontiguousarray(reader(i))
    except BadImage as e:
        return i, None, b"", e.reason, e.detail
    return i, image, hashlib.sha256(image.data).digest(), "", ""


def _read_in_worker(i: int):
    return _read(_worker_reader, i)


# ----------------------------------------------------------------------------- entry files

def _npy_header(shape: tuple[int, ...], total: int | None = None) -> bytes:
    """An .npy v1.0 header for uint8 `shape`, padded to `total` bytes (a multiple of 64).

    The header is written first for the full listing and rewritten in place with the final
    row count, which has no more digits, so the pixel data never has to be moved.
    """
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    base = len(_NPY_MAGIC) + 2 + len(text) + 1
    total = total or -(-base // 64) * 64
    assert base <= total, (base, total)
    body = (text + " " * (total - base) + "\n").encode("latin1")
    return _NPY_MAGIC + struct.pack("<H", len(body)) + body


def _entry_name(listing: Listing, size: int, mode: str, key: str, face_crop=()) -> str:
    base = listing.origin[0] if listing.kind == "tfds" else os.path.basename(
        os.path.normpath(listing.root))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._") or listing.kind
    # The box in the name too, so entries of one folder with different boxes are told apart.
    box = f"-box{'_'.join(f'{v:g}' for v in face_crop)}" if face_crop else ""
    return f"{slug[:40]}-{size}{mode}{box}-{key[:20]}"


def _utf8(text: str) -> bytes:
    # File names that are not valid UTF-8 reach Python as surrogate escapes: hash those too.
    return text.encode("utf-8", "surrogatepass")


class _Content:
    """Accumulates `content_identity` row by row, in row order."""

    def __init__(self, class_names: list[str]):
        self.class_names = list(class_names)
        self.files, self.pixels, self.count = hashlib.sha256(), hashlib.sha256(), 0
        self.files.update(_utf8(json.dumps(self.class_names)))

    def add(self, path: str, label: int, digest: bytes) -> None:
        name = self.class_names[label] if label >= 0 else ""
        self.files.update(_utf8(f"{path}\0{name}\n"))
        self.pixels.update(digest)
        self.count += 1

    def result(self) -> dict:
        return {"version": 1, "images": self.count, "classes": len(self.class_names),
                "files": self.files.hexdigest(), "pixels": self.pixels.hexdigest()}


def content_identity(images: np.ndarray, paths, labels, class_names) -> dict:
    """What the decoded data is, independent of where it lives and of file times: its number
    of images and classes, a sha256 over (path, class name) of every row, and a sha256 over
    the rows' own sha256 of their decoded pixels. Two entries with equal `files` and `pixels`
    hold the same images under the same names and labels."""
    content = _Content(class_names)
    for j, (path, label) in enumerate(zip(paths, np.asarray(labels).tolist())):
        content.add(path, label, hashlib.sha256(np.ascontiguousarray(images[j]).data).digest())
    return content.result()


def _manifest_key(listing: Listing, reader, size: int, mode: str, max_pixels: int,
                  face_crop=()) -> str:
    h = hashlib.sha256()
    head = {"version": FORMAT_VERSION, "kind": listing.kind, "origin": list(listing.origin),
            "image_size": size, "resize_mode": mode, "max_pixels": max_pixels,
            "class_names": list(listing.class_names)}
    if face_crop:  # only when set: entries made before face_crop existed keep their keys
        head["face_crop"] = list(face_crop)
    h.update(json.dumps(head, sort_keys=True).encode())
    stats = reader.fingerprint()
    if listing.kind == "files":
        for path, label, stat in zip(listing.paths, listing.labels.tolist(), stats):
            h.update(_utf8(f"{path}\0{label}\0{stat}\n"))
    else:
        for stat in stats:
            h.update(f"{stat}\n".encode())
        h.update(np.ascontiguousarray(listing.ids, np.int64).tobytes())
        h.update(np.ascontiguousarray(listing.labels, np.int32).tobytes())
        h.update(_utf8("\n".join(listing.paths)))
    return h.hexdigest()


def _load_entry(directory: str, key: str, size: int) -> CachedImages | None:
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
        if manifest.get("key") != key:
            return None
        images = np.load(os.path.join(directory, "images.npy"), mmap_mode="r")
        rows = np.load(os.path.join(directory, "rows.npy"))
        with open(os.path.join(directory, "skipped.json")) as f:
            skipped = [(s["path"], s["reason"]) for s in json.load(f)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if images.dtype != np.uint8 or images.shape != (len(rows), size, size, 3):
        return None
    content = manifest.get("content")
    content = content if isinstance(content, dict) and "pixels" in content else None
    return CachedImages(images, rows, skipped, directory, reused=True, content=content)


def _add_content(entry: CachedImages, listing: Listing) -> CachedImages:
    """An entry built before contents were hashed: hashes it once and records it in its
    manifest (when the cache folder is writable)."""
    print(f"hashing the {len(entry.rows)} images of an older cache entry (once)", flush=True)
    content = content_identity(entry.images, [listing.paths[r] for r in entry.rows],
                               listing.labels[entry.rows], listing.class_names)
    path = os.path.join(entry.directory, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
        manifest["content"] = content
        write_file_atomic(path, json.dumps(manifest, indent=1).encode())
    except (OSError, ValueError):
        pass  # a read-only cache: hashed again next time
    return dataclasses.replace(entry, content=content)


def _remove_stale_tmp(parent: str, name: str) -> None:
    """Deletes temporary folders left by builds of this entry whose process has died."""
    prefix = f".{name}.tmp-"
    for entry in os.listdir(parent):
        if not entry.startswith(prefix):
            continue
        try:
            os.kill(int(entry[len(prefix):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
        except (ValueError, PermissionError):
            pass


# Manifest fields that name a source and its decode settings: entries that agree on all of
# them but differ in key hold an older state of the same files.
_IDENTITY = ("kind", "root", "origin", "image_size", "resize_mode", "max_pixels", "face_crop")


def _superseded(directory: str) -> list[tuple[str, int]]:
    """(path, bytes) of the other entries of `directory`'s source and decode settings."""
    parent, name = os.path.split(directory)
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            mine = json.load(f)
    except (OSError, ValueError):
        return []
    found = []
    for other in os.listdir(parent):
        path = os.path.join(parent, other)
        if other == name or other.startswith(".") or not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, "manifest.json")) as f:
                theirs = json.load(f)
        except (OSError, ValueError):
            continue  # not an entry, or one being written: leave it
        if not isinstance(theirs, dict) or theirs.get("key") == mine["key"] or \
                any(theirs.get(k) != mine.get(k) for k in _IDENTITY):
            continue
        found.append((path, sum(e.stat().st_size for e in os.scandir(path) if e.is_file())))
    return found


def summarize_skipped(skipped: list[tuple[str, str]]) -> str:
    """'3 truncated, 2 not an image' (most common reason first)."""
    counts = collections.Counter(reason for _, reason in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _resolve_workers(requested: int, n: int, parallel: bool) -> int:
    if not parallel or not _can_spawn():
        return 1
    if requested > 0:
        return max(1, min(requested, n))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # Starting a worker costs ~0.5 s (a fresh interpreter); not worth it for a few hundred images.
    return max(1, min(cpus or 1, n // 500))


def _can_spawn() -> bool:
    # A spawned worker re-imports the main script by path; from stdin ('<stdin>') it cannot.
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.exists(main_file)


def _decode_all(reader, n: int, workers: int):
    """Yields (row, image | None, sha256 of the image, reason, detail) in row order."""
    if workers <= 1:
        for i in range(n):
            yield _read(reader, i)
        return
    # spawn, not fork: the caller may already run JAX's threads, and forking a multithreaded
    # process can deadlock the child. An executor, unlike multiprocessing.Pool, notices a
    # worker that dies (a crashing decoder, the OOM killer) instead of waiting forever.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(reader, ExitWithParent()))
    try:
        chunk = max(1, min(64, n // (workers * 8)))
        yield from pool.map(_read_in_worker, range(n), chunksize=chunk)
    except BrokenProcessPool:
        raise DataError("a decode worker process died (a crashing decoder or out of memory); "
                        "rerun with --config.data.decode_workers=1 to see which file") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def check_entry_size(count: int, size: int, parent: str, max_cache_gb: float) -> None:
    """Refuses an entry of `count` rows of size x size x 3 bytes above `max_cache_gb` (0: no
    cap) or above the free disk under `parent`, before any of it is written."""
    if isinstance(max_cache_gb, bool) or not isinstance(max_cache_gb, (int, float)) \
            or not max_cache_gb >= 0:
        raise ConfigError(f"data.max_cache_gb must be a number >= 0 (0 = no cap), "
                          f"got {max_cache_gb!r}")
    need = count * size * size * 3
    what = f"the cache of {count} images of {size}x{size}"
    if max_cache_gb and need > max_cache_gb * 1e9:
        raise ConfigError(f"{what} would take {need / 1e9:,.1f} GB, above "
                          f"data.max_cache_gb={max_cache_gb:g}: lower data.image_size, cap the "
                          f"data (data.max_images) or raise data.max_cache_gb")
    limits.check_disk(need, parent, "data.image_size (or cap the data with data.max_images)",
                      what)


def _build(listing: Listing, reader, directory: str, key: str, size: int, mode: str,
           max_pixels: int, workers: int, face_crop=(), max_cache_gb: float = 0.0
           ) -> CachedImages:
    parent, name = os.path.split(directory)
    check_entry_size(len(listing), size, parent, max_cache_gb)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    os.makedirs(tmp)
    n = len(listing)
    start = time.perf_counter()
    try:
        kept, failed = [], []
        content = _Content(listing.class_names)
        labels = listing.labels.tolist()
        row_bytes = size * size * 3
        with open(os.path.join(tmp, "images.npy"), "wb") as f:
            header = _npy_header((n, size, size, 3))
            f.write(header)
            bar = tqdm(total=n, desc=f"decoding {name.rsplit('-', 1)[0]}", unit="img",
                       disable=None, mininterval=0.5)
            with bar:
                for i, image, digest, reason, detail in _decode_all(reader, n, workers):
                    if image is None:
                        failed.append((listing.paths[i], reason, detail))
                    else:
                        assert image.shape == (size, size, 3) and image.dtype == np.uint8
                        f.write(image.data)
                        content.add(listing.paths[i], labels[i], digest)
                        kept.append(i)
                    bar.update(1)
            f.seek(0)
            f.write(_npy_header((len(kept), size, size, 3), total=len(header)))
            assert f.seek(0, os.SEEK_END) == len(header) + len(kept) * row_bytes
        skipped = [(p, r) for p, r in listing.skipped] + [(p, r) for p, r, _ in failed]
        if not kept:
            examples = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
            raise DataError(f"no usable images in {listing.root}: all {n} failed to decode "
                            f"({summarize_skipped(skipped)}), e.g. {examples}")
        rows = np.asarray(kept, np.int64)
        np.save(os.path.join(tmp, "rows.npy"), rows)
        np.save(os.path.join(tmp, "labels.npy"), listing.labels[rows])
        with open(os.path.join(tmp, "paths.json"), "w") as f:
            json.dump([listing.paths[r] for r in kept], f)
        with open(os.path.join(tmp, "skipped.json"), "w") as f:
            json.dump([{"path": p, "reason": r, "detail": ""} for p, r in listing.skipped]
                      + [{"path": p, "reason": r, "detail": d} for p, r, d in failed], f, indent=1)
        manifest = {"key": key, "version": FORMAT_VERSION, "kind": listing.kind,
                    "root": os.path.abspath(listing.root), "origin": list(listing.origin),
                    "image_size": size, "resize_mode": mode, "max_pixels": max_pixels,
                    "face_crop": list(face_crop), "num_images": len(kept),
                    "num_skipped": len(skipped),
                    "class_names": list(listing.class_names), "content": content.result(),
                    "seconds": round(time.perf_counter() - start, 3), "workers": workers}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:  # written last
            json.dump(manifest, f, indent=1)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process finished the same entry first; use theirs
            if _load_entry(directory, key, size) is None:
                raise
    except OSError as e:  # e.g. the disk filled up after all: nothing half-written remains
        raise DataError(f"cannot write the cache entry {directory}: {e.strerror or e} (set "
                        f"data.cache_dir or $FACEJAX_CACHE to a disk with room)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    entry = _load_entry(directory, key, size)
    if entry is None:
        raise DataError(f"cache entry {directory} could not be read back after writing it")
    return dataclasses.replace(entry, reused=False)


def _build_once(listing: Listing, reader, directory: str, key: str, size: int, mode: str,
                max_pixels: int, workers: int, face_crop, max_cache_gb: float) -> CachedImages:
    """Builds the entry, one process at a time: a second process asking for the same entry
    waits for the first (a lock the kernel drops if that one dies), then reuses its work."""
    parent, name = os.path.split(directory)

    def waiting(holder: str) -> None:
        print(f"waiting for another process to finish decoding the same images into "
              f"{directory}: {holder}", flush=True)

    with hold_lock(os.path.join(parent, f".{name}.lock"), "decoding", wait=True,
                   on_wait=waiting) as lock:
        try:
            entry = _load_entry(directory, key, size)  # built while this process waited
            if entry is None:
                if os.path.exists(directory):  # unreadable leftovers (edited by hand): rebuild
                    shutil.rmtree(directory)
                _remove_stale_tmp(parent, name)
                workers = _resolve_workers(workers, len(listing), reader.parallel)
                entry = _build(listing, reader, directory, key, size, mode, max_pixels, workers,
                               face_crop, max_cache_gb=max_cache_gb)
        finally:
            # The lock only saves work (an entry appears by rename, whole): whoever still waits
            # on this file finds the entry, or builds it, and nothing else is left behind.
            lock.discard()
    return entry


def cache_listing(listing: Listing, *, image_size: int, resize_mode: str = "crop",
                  max_pixels: int = 50_000_000, cache_dir: str = "",
                  workers: int = 0, face_crop=(), prune: bool = False,
                  max_cache_gb: float = 0.0) -> CachedImages:
    """Returns the decoded images of `listing`, building the cache entry if needed.

    Files that fail to decode are left out (see `rows`) and, with the scan's own skipped
    entries, listed with reasons in the entry's skipped.json; one summary line is printed.
    `workers=0` picks one process per core (and none for small listings). `face_crop` is
    `decode.decode_image`'s box; entries with different boxes never share a folder or key.
    `prune` deletes the older entries of the same source and settings (otherwise a newly
    built entry only reports them). A new entry must fit `max_cache_gb` (0: no cap) and the
    free disk. The entry's `content` identifies the decoded data (`content_identity`).

    Raises:
      DataError: when no image of the listing can be decoded, or the cache folder is unusable
        or too small.
      ConfigError: for an invalid `face_crop`, an image_size above its bound, or an entry
        above `max_cache_gb`.
    """
    face_crop = decode.check_face_crop(face_crop)
    if resize_mode not in decode.RESIZE_MODES:
        raise DataError(f"data.resize_mode must be one of {decode.RESIZE_MODES}, "
                        f"got {resize_mode!r}")
    if image_size < 1:
        raise DataError(f"data.image_size must be positive, got {image_size}")
    limits.check_size("data.image_size", image_size)
    if len(listing) == 0:
        raise DataError(f"no images to decode under {listing.root}")
    reader = _READERS[listing.kind](listing, image_size, resize_mode, max_pixels, face_crop)
    key = _manifest_key(listing, reader, image_size, resize_mode, max_pixels, face_crop)
    parent = default_cache_dir(cache_dir)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create cache folder {parent}: {e.strerror or e} "
                        f"(set data.cache_dir or $FACEJAX_CACHE)") from None
    name = _entry_name(listing, image_size, resize_mode, key, face_crop)
    directory = os.path.join(parent, name)
    entry = _load_entry(directory, key, image_size)
    if entry is None:
        entry = _build_once(listing, reader, directory, key, image_size, resize_mode, max_pixels,
                            workers, face_crop, max_cache_gb)
    if entry.content is None:
        entry = _add_content(entry, listing)
    what = "reused cache of" if entry.reused else "decoded"
    line = f"{what} {len(entry.rows)} images"
    if entry.skipped:
        line += (f", skipped {len(entry.skipped)} ({summarize_skipped(entry.skipped)}) — see "
                 f"{os.path.join(directory, 'skipped.json')}")
    print(line, flush=True)
    old = _superseded(directory) if prune or not entry.reused else []

    def described(entries):
        return (f"{len(entries)} older cache entr{'y' if len(entries) == 1 else 'ies'} of this "
                f"source ({sum(b for _, b in entries) / 2**20:.1f} MB)")

    if old and prune:
        for path, _ in old:
            shutil.rmtree(path, ignore_errors=True)
        left = [path for path, _ in old if os.path.exists(path)]
        gone = [e for e in old if e[0] not in left]
        print(f"removed {described(gone)}" + (f"; could not remove {', '.join(left)}"
                                               if left else ""), flush=True)
    elif old:
        print(f"note: {described(old)} can no longer be reused; "
              f"scripts/prepare_data.py --prune_cache removes them", flush=True)
    return entry
