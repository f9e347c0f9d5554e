"""What the service holds: the run's embedder and live gallery, loaded once, and the queries
it answers with them (search, verify, enrol, thumbnails). The HTTP layer is `app.py`."""

from __future__ import annotations

import collections
import importlib.util
import io
import logging
import os
import threading
import time

import numpy as np
from PIL import Image

from facejax.data.decode import BadImage, read_rgb, read_rgb_bytes
from facejax.errors import ConfigError
from facejax.retrieval.embed import load_embedder
from facejax.retrieval.run_data import prepare_run_data, run_face_crop
from facejax.retrieval.verify_run import calibrated_threshold, match_threshold
from facejax.rundir import EMBEDDER_DIR, INDEX_DIR, read_run_config
from facejax.serve.batcher import Batcher
from facejax.serve.gallery import Gallery
from facejax.serve.metrics import Metrics
from facejax.serve.settings import ServeSettings
from facejax.serve.uploads import UploadError, decode_upload

log = logging.getLogger(__name__)

_SMALL_K = 16          # searches ask the index for 16 or max_k results: two compiled shapes
_THUMB_CACHE = 4096    # thumbnails kept in memory (a few KB each)
_FILE_SOURCES = ("folder", "competition")


class ExplainBusy(Exception):
    """Another explanation is being computed (one at a time: each is many forward passes)."""


class SearchService:
    """The loaded run. `warm_up()` compiles; the app sets `ready` once the request path is warm
    too."""

    def __init__(self, workdir: str, settings: ServeSettings):
        self.workdir = os.path.abspath(workdir)
        self.settings = settings
        self.config = read_run_config(workdir)
        self.embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
        meta = self.embedder.meta
        self.gallery = Gallery.open(workdir, os.path.join(workdir, INDEX_DIR), expect=meta,
                                    compact_every=settings.compact_every)
        self.size, self.mode = int(meta["cache_size"]), meta["resize_mode"]
        self.face_crop = run_face_crop(self.config, meta)
        self.max_pixels = min(settings.max_pixels, int(self.config.data.max_pixels))
        # Pair verification (/v1/verify) uses the pair threshold; a search's "match" flag the
        # open-set one when the run's evaluation measured it (verify_run.match_threshold).
        self.threshold, self.threshold_source = calibrated_threshold(workdir)
        self.match_threshold, self.match_threshold_source = match_threshold(workdir)
        self.metrics = Metrics(settings.batch_sizes[-1])
        self.batcher = Batcher(self.embedder, self._search, batch_sizes=settings.batch_sizes,
                               max_wait_s=settings.max_wait_ms / 1000,
                               queue_size=settings.queue_size, on_batch=self.metrics.on_batch,
                               workers=settings.embed_workers)
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self.metrics.gallery_size.set_function(lambda: self.gallery.size)
        self.ready = False
        self._aligner = None
        self._aligner_lock = threading.Lock()
        self._thumbs: collections.OrderedDict = collections.OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._data = None  # the run's decoded images, for galleries that are not files
        self._explainer = None  # loaded on the first /v1/explain (restores the checkpoint)
        self._explain_lock = threading.Lock()

    # -- life cycle

    def warm_up(self) -> float:
        """Compiles the embedder for every batch size and the search for each shape it uses;
        returns the seconds it took. The service is ready afterwards."""
        t0 = time.perf_counter()
        self.batcher.start()
        for fmt in ("JPEG", "PNG"):  # PIL loads its plugins on the first decode
            self.decode(self.sample_image(fmt), "warm-up image")
        blank = np.zeros((1, self.size, self.size, 3), np.uint8)
        for b in self.settings.batch_sizes:
            emb = self.embedder(np.repeat(blank, b, axis=0))
            for k in sorted({_SMALL_K, self.settings.max_k}):
                self._search(emb, k)
        return time.perf_counter() - t0

    def sample_image(self, fmt: str = "JPEG") -> bytes:
        """An encoded noise image at the input size, for warming the request path up."""
        pixels = np.random.default_rng(0).integers(0, 256, (self.size, self.size, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        return buf.getvalue()

    def close(self) -> None:
        self.ready = False
        self.batcher.stop()
        self.gallery.compact()

    # -- what the endpoints call

    @property
    def expects_face_chips(self) -> bool:
        return bool(self.face_crop) or self.embedder.meta.get("normalization") == "dlib"

    @property
    def alignment_available(self) -> bool:
        return importlib.util.find_spec("dlib") is not None

    def info(self) -> dict:
        meta, s = self.embedder.meta, self.settings
        return dict(
            model=meta.get("model"), embed_dim=int(meta["embed_dim"]), input_size=self.size,
            resize_mode=self.mode, face_crop=list(self.face_crop),
            expects_face_chips=self.expects_face_chips,
            alignment_available=self.alignment_available,
            faces_note=self._faces_note(),
            gallery_size=self.gallery.size, backend=self.gallery.index.backend,
            search_warning=self.search_warning(),
            threshold=self.threshold, threshold_source=self.threshold_source,
            match_threshold=self.match_threshold,
            match_threshold_source=self.match_threshold_source,
            auth=dict(writes=True, reads=s.auth_reads),
            limits=dict(max_upload_bytes=s.max_upload_bytes, max_pixels=self.max_pixels,
                        max_k=s.max_k, max_batch=s.max_batch, max_files=s.max_files))

    def search_warning(self) -> str:
        """'' unless the ScaNN index serves a setting that missed its recall target (or was
        never tuned): the service then says so in /v1/info and at start-up."""
        index = self.gallery.index
        if index.backend != "scann":
            return ""
        tuning = index.tuning or {}
        if not tuning:
            return ("the ScaNN index was never tuned: its recall against exact search is "
                    "unknown; rebuild it with scripts/build_index.py")
        if tuning.get("met") is False:
            return (f"the ScaNN index serves recall@{tuning.get('k')} {tuning.get('recall'):.3f}, "
                    f"below its target {tuning.get('target_recall')}")
        return ""

    def _faces_note(self) -> str:
        if not self.expects_face_chips:
            return ""
        crop = (f" with data.face_crop={tuple(self.face_crop)} applied to each upload"
                if self.face_crop else "")
        how = ("send align=true to align raw photos with dlib's detector and landmarks"
               if self.alignment_available else
               "raw photos need alignment: pip install -e '.[faces]' (dlib-bin) and send "
               "align=true")
        return f"this model expects aligned face chips{crop}; {how}"

    def decode(self, data: bytes, what: str, align: bool = False) -> np.ndarray:
        """An upload as the embedder's input (UploadError for a bad one)."""
        return decode_upload(data, what, size=self.size, mode=self.mode,
                             max_pixels=self.max_pixels,
                             max_bytes=self.settings.max_upload_bytes,
                             face_crop=() if align else self.face_crop,
                             aligner=self.aligner() if align else None)

    def aligner(self):
        with self._aligner_lock:
            if self._aligner is None:
                if not self.alignment_available:
                    raise UploadError(422, "align=true needs dlib: install the faces extra "
                                           "(pip install -e '.[faces]', which brings dlib-bin)")
                from facejax.data.align_dlib import FaceAligner

                try:
                    self._aligner = FaceAligner(size=self.size)
                except ConfigError as e:
                    raise UploadError(422, f"cannot align faces: {e}") from None
            return self._aligner

    def _search(self, embeddings: np.ndarray, k: int) -> list[list[dict]]:
        k_shape = _SMALL_K if k <= _SMALL_K else max(k, self.settings.max_k)
        hits = self.gallery.search(embeddings, k_shape)
        for row in hits:
            for h in row:
                h["match"] = (None if self.match_threshold is None
                              else h["score"] >= self.match_threshold)
        return hits

    # -- explanations

    def explain(self, query: np.ndarray, item_id: int, method: str = "auto") -> dict | None:
        """Heatmaps of why gallery item `item_id` matches `query` (the embedder's input):
        {id, method, score, query_overlay, result_overlay (PNG data URLs), note}; None for no
        such item. One at a time (ExplainBusy). The explainer is loaded on first use: from
        the run's checkpoint (similarity maps) or, without one, from the exported embedder
        (occlusion only); `retrieval.explain` says how."""
        import base64

        from facejax.retrieval import explain as ex

        located = self.gallery.locate(item_id)
        if located is None:
            return None
        if not self._explain_lock.acquire(blocking=False):
            raise ExplainBusy()
        try:
            if self._explainer is None:
                self._explainer = ex.load_explainer(self.workdir, self.embedder)
            result = self._input_pixels(*located)
            if result is None:
                return None
            e = self._explainer.explain(query, result, method)
        finally:
            self._explain_lock.release()
        q_over, r_over = ex.overlays(query, result, e)
        url = lambda im: "data:image/png;base64," + base64.b64encode(  # noqa: E731
            ex.png_bytes(im)).decode()
        why = self._explainer.why_not_similarity
        return dict(id=item_id, method=e.method, score=e.score, query_overlay=url(q_over),
                    result_overlay=url(r_over),
                    note="" if e.method == ex.SIMILARITY else f"no similarity maps: {why}")

    def _input_pixels(self, kind: str, where: str) -> np.ndarray | None:
        """A gallery item as the embedder's input (size, resize mode, face crop)."""
        from facejax.data.decode import decode_image

        try:
            if kind == "enrolled":
                with open(where, "rb") as f:
                    return self.decode(f.read(), f"gallery item {where}")
            full = self._dataset_file(where)
            if full is not None:
                return decode_image(full, self.size, self.mode, int(self.config.data.max_pixels),
                                    self.face_crop)
            if self.gallery.index.info.get("source", "folder") in _FILE_SOURCES:
                return None
            return self._from_run_data(where)
        except (BadImage, UploadError, OSError) as e:
            log.warning("cannot explain %s: %s", where, e)
            return None

    def _dataset_file(self, where: str) -> str | None:
        """The file of a dataset gallery item, if the gallery is files and it stays under the
        data root; else None."""
        info = self.gallery.index.info
        if info.get("source", "folder") not in _FILE_SOURCES:
            return None
        root = os.path.realpath(info.get("root") or "")
        full = os.path.realpath(os.path.join(root, where))
        if not root or os.path.commonpath([root, full]) != root:
            log.warning("gallery path %r leaves the data root; not served", where)
            return None
        return full

    # -- thumbnails

    def thumbnail(self, item_id: int, side: int) -> bytes | None:
        """JPEG bytes of a gallery item at most `side` px across, or None for no such item."""
        located = self.gallery.locate(item_id)
        if located is None:
            return None
        key = (item_id, side)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        pixels = self._pixels(*located)
        if pixels is None:
            return None
        im = Image.fromarray(pixels)
        im.thumbnail((side, side), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=88)
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data

    def _pixels(self, kind: str, where: str) -> np.ndarray | None:
        try:
            if kind == "enrolled":
                with open(where, "rb") as f:
                    return read_rgb_bytes(f.read(), self.max_pixels)
            if self.gallery.index.info.get("source", "folder") in _FILE_SOURCES:
                full = self._dataset_file(where)
                return None if full is None else read_rgb(full, int(self.config.data.max_pixels))
            return self._from_run_data(where)
        except (BadImage, OSError) as e:
            log.warning("no thumbnail for %s: %s", where, e)
            return None

    def _from_run_data(self, path: str) -> np.ndarray | None:
        """Gallery images that are not files (idx, tfds): from the run's decoded cache."""
        with self._thumbs_lock:
            if self._data is None:
                data = prepare_run_data(self.config, self.embedder)
                self._data = (data.images, {p: i for i, p in enumerate(data.paths)})
        images, row_of = self._data
        row = row_of.get(path)
        return None if row is None else np.asarray(images[row])

