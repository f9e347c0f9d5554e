"""Landmark alignment of raw photos with dlib: one face chip per image (the largest face).

Faces are found by dlib's HOG detector, its CNN (MMOD) detector, or taken to fill the whole
image (inputs that are already face crops); see `FaceAligner`.

dlib (`pip install dlib-bin`) and its 5-point landmark model (PyPI `face_recognition_models`,
or any `shape_predictor_5_face_landmarks.dat`) are optional and imported only here. The chips
are what `dlib.get_face_chip` cuts: 150x150 with padding 0.25 is the input dlib's face
embedder was trained on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import numpy as np
from PIL import Image

from facejax.atomic import atomic_path
from facejax.data import decode
from facejax.data.decode import BadImage
from facejax.errors import ConfigError, DataError

PREDICTOR_5 = "shape_predictor_5_face_landmarks.dat"
LOG_NAME = ".align_skipped.json"  # hidden, so scan_folder never sees it
_KEEP_EXTS = (".jpg", ".jpeg", ".png")  # other formats are written as .png
# Detection runs on a copy whose long side is at most this (times 2**upsample): HOG cost grows
# with the pixel count, and a face too small to find at this size is too small to embed.
DETECT_MAX_SIDE = 1024


def import_dlib():
    try:
        import dlib
    except ImportError:
        raise ConfigError("face alignment needs dlib: pip install dlib-bin") from None
    return dlib


def predictor_path(path: str | None = None) -> str:
    """`path`, else the 5-point model shipped by PyPI's face_recognition_models."""
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"landmark model {path} not found")
        return path
    # find_spec locates the package without importing it (its __init__ needs pkg_resources).
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is not None and spec.submodule_search_locations:
        found = os.path.join(next(iter(spec.submodule_search_locations)), "models", PREDICTOR_5)
        if os.path.isfile(found):
            return found
    raise ConfigError(f"no {PREDICTOR_5}: pip install face_recognition_models, or pass the "
                      f"model file's path (--predictor)")


DETECTORS = ("hog", "cnn", "whole")
CNN_DETECTOR = "mmod_human_face_detector.dat"


def check_detectors(detector: str) -> tuple[str, ...]:
    """'hog', 'cnn', 'whole' or a comma list of them tried in order (e.g. 'hog,whole')."""
    names = tuple(d.strip() for d in str(detector).split(",") if d.strip())
    bad = [d for d in names if d not in DETECTORS]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"detector must be one of {DETECTORS} or a comma list of them tried "
                          f"in order (e.g. hog,whole), got {detector!r}")
    return names


class FaceAligner:
    """Face detection + dlib's 5-point landmarks + `get_face_chip`.

    Detectors, tried in the given order until one finds a face:
    - `hog`: dlib's frontal HOG detector (fast; misses faces in hard side light and in crops
      too tight to show the whole head);
    - `cnn`: dlib's MMOD CNN detector (`mmod_human_face_detector.dat`, from PyPI
      face_recognition_models): finds far more of those, about 10-40x slower on a CPU;
    - `whole`: the whole image is the face box (for inputs that are already face crops); the
      landmarks are still fitted, so the chip is aligned like the others.
    `last_detector` names the one that found the last face.
    """

    def __init__(self, size: int = 150, padding: float = 0.25, upsample: int = 1,
                 predictor: str | None = None, detector: str = "hog"):
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ConfigError(f"chip size must be a whole number >= 8, got {size!r}")
        if isinstance(padding, bool) or not (isinstance(padding, (int, float))
                                             and 0 <= padding <= 2):
            raise ConfigError(f"chip padding must be in [0, 2] (dlib's default 0.25), "
                              f"got {padding!r}")
        if isinstance(upsample, bool) or not isinstance(upsample, int) or not 0 <= upsample <= 3:
            raise ConfigError(f"upsample must be 0..3 (each step doubles the image the detector "
                              f"scans), got {upsample!r}")
        self.detectors = check_detectors(detector)
        self.dlib = import_dlib()
        self.size, self.padding, self.upsample = size, float(padding), upsample
        self.predictor_file = predictor_path(predictor)
        self.detector = self.dlib.get_frontal_face_detector()
        self.cnn = None
        if "cnn" in self.detectors:
            path = os.path.join(os.path.dirname(self.predictor_file), CNN_DETECTOR)
            if not os.path.isfile(path):
                raise ConfigError(f"the cnn detector needs {CNN_DETECTOR} beside the landmark "
                                  f"model: pip install face_recognition_models")
            self.cnn = self.dlib.cnn_face_detection_model_v1(path)
        try:
            self.predictor = self.dlib.shape_predictor(self.predictor_file)
        except RuntimeError as e:  # dlib's deserialisation error
            raise ConfigError(f"cannot load landmark model {self.predictor_file}: {e}") from None
        self.last_detector = ""

    def settings(self) -> dict:
        return dict(size=self.size, padding=self.padding, upsample=self.upsample,
                    predictor=os.path.basename(self.predictor_file),
                    detector=",".join(self.detectors))

    def _detect(self, name: str, small: np.ndarray) -> list:
        if name == "hog":
            return list(self.detector(small, self.upsample))
        if name == "cnn":
            return [d.rect for d in self.cnn(small, self.upsample)]
        h, w = small.shape[:2]
        return [self.dlib.rectangle(0, 0, w - 1, h - 1)]

    def landmarks(self, img: np.ndarray):
        """The largest face's `dlib.full_object_detection` in `img` coordinates, or None."""
        h, w = img.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(h, w))
        small = img
        if scale < 1.0:
            small = np.asarray(Image.fromarray(img).resize(
                (max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))
        for name in self.detectors:
            faces = self._detect(name, small)
            if faces:
                self.last_detector = name
                f = max(faces, key=lambda r: r.area())
                rect = self.dlib.rectangle(int(f.left() / scale), int(f.top() / scale),
                                           int(f.right() / scale), int(f.bottom() / scale))
                return self.predictor(img, rect)  # landmarks at full resolution
        return None

    def align(self, img: np.ndarray) -> np.ndarray | None:
        """np.uint8 [size, size, 3] chip of the largest face, or None without a face."""
        img = np.ascontiguousarray(img, dtype=np.uint8)
        shape = self.landmarks(img)
        if shape is None:
            return None
        return np.asarray(self.dlib.get_face_chip(img, shape, size=self.size,
                                                  padding=self.padding), dtype=np.uint8)


@dataclasses.dataclass
class AlignSummary:
    written: int = 0
    existing: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    by_detector: dict[str, int] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        from facejax.data.cache import summarize_skipped

        text = f"aligned {self.written} images"
        if len(self.by_detector) > 1 or set(self.by_detector) - {"hog"}:
            text += " (" + ", ".join(f"{n} by {d}" for d, n in self.by_detector.items()) + ")"
        text += f", kept {self.existing} existing"
        if self.skipped:
            text += f", skipped {len(self.skipped)} ({summarize_skipped(self.skipped)})"
        return text


def list_images(src: str) -> list[str]:
    """Image files under `src` (relative paths, sorted; hidden files and folders ignored)."""
    from facejax.data.sources import IMAGE_EXTS

    found = []
    for dirpath, dirnames, files in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.relpath(os.path.join(dirpath, f), src) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    return found


def output_name(rel: str) -> str:
    stem, ext = os.path.splitext(rel)
    return rel if ext.lower() in _KEEP_EXTS else stem + ".png"


def _stat(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"  # read_rgb reports it as unreadable
    return f"{st.st_size}:{st.st_mtime_ns}"


def _read_log(dst: str, settings: dict) -> dict:
    """Skips recorded by an earlier run with the same settings ({rel: [stat, reason]})."""
    try:
        with open(os.path.join(dst, LOG_NAME)) as f:
            log = json.load(f)
        return log["skipped"] if log.get("settings") == settings else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save(chip: np.ndarray, path: str) -> None:
    """Writes through a temporary file, so an interrupted run never leaves a partial chip that
    a resumed run would keep."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ext = os.path.splitext(path)[1].lower()
    with atomic_path(path, ext) as tmp:
        Image.fromarray(chip).save(tmp, format="PNG" if ext == ".png" else "JPEG", quality=95)


def align_folder(src: str, dst: str, size: int = 150, padding: float = 0.25, upsample: int = 1,
                 *, predictor: str | None = None, detector: str = "hog",
                 max_pixels: int = 50_000_000, progress: bool = True) -> AlignSummary:
    """Writes one aligned chip per image of `src` (largest face) into `dst`, same layout.

    Resumable: chips already in `dst` are kept, and images an earlier run with the same
    settings skipped (no face) are not searched again unless they changed. Unreadable and
    faceless images are skipped and counted with their reason (also in `dst/.align_skipped.json`).

    Raises:
      DataError: `src` missing or without images, or `dst` inside `src`.
      ConfigError: dlib or the landmark model missing, or bad settings.
    """
    from tqdm import tqdm

    if not os.path.isdir(src):
        raise DataError(f"source folder {src} not found")
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if d == s or d.startswith(s + os.sep):
        raise DataError(f"the output folder {dst} must not be inside the source folder {src}")
    aligner = FaceAligner(size, padding, upsample, predictor, detector)
    files = list_images(src)
    if not files:
        raise DataError(f"no images under {src}")
    os.makedirs(dst, exist_ok=True)
    settings = aligner.settings()
    known = _read_log(dst, settings)
    log = dict(known)  # an interrupted run keeps what earlier runs learnt
    summary = AlignSummary()
    try:
        for rel in tqdm(files, desc="align", unit="img", disable=not progress):
            out = os.path.join(dst, output_name(rel))
            if os.path.exists(out):
                summary.existing += 1
                continue
            path = os.path.join(src, rel)
            stat = _stat(path)
            if rel in known and known[rel][0] == stat:
                reason = known[rel][1]
            else:
                try:
                    chip = aligner.align(decode.read_rgb(path, max_pixels))
                    reason = "no face" if chip is None else ""
                except BadImage as e:
                    reason = e.reason
                if not reason:
                    _save(chip, out)
                    summary.written += 1
                    used = aligner.last_detector
                    summary.by_detector[used] = summary.by_detector.get(used, 0) + 1
                    continue
            summary.skipped.append((rel, reason))
            log[rel] = [stat, reason]
    finally:
        with open(os.path.join(dst, LOG_NAME), "w") as f:
            json.dump(dict(settings=settings, skipped=log), f, indent=1)
    return summary
