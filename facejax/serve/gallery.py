"""The live gallery: the saved index plus a durable log of the enrolments and deletions since.

Layout inside the run folder:
  index/                 the saved index (`SearchIndex.save`, atomic)
  gallery/log.jsonl      append-only change log, one record a line: "<crc32 hex> <json>\\n"
  gallery/images/<id>.<ext>  the uploaded image of each enrolled item, as received

A change is applied only after its record (and the image, for an enrolment) is on disk and
fsynced, so an acknowledged change survives `kill -9`. Compaction saves the index with every
change applied (atomically), then empties the log. Replaying is idempotent: an enrolment whose
id is below the index's `next_id` is already in it, a deletion of an absent id is done, so a
crash between the two steps of a compaction applies nothing twice. A torn last record (a crash
mid-write, never acknowledged) is cut off; a damaged record before the last is an error.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from facejax.atomic import fsync_dir, recover_dir, write_file_atomic
from facejax.errors import CheckpointError, DataError
from facejax.retrieval.index import SearchIndex, load_index

log = logging.getLogger(__name__)

GALLERY_DIR, LOG_NAME, IMAGES_DIR = "gallery", "log.jsonl", "images"
# Paths of enrolled items. Dataset paths are "<folder>/<file>", so these never collide.
ENROLLED_PREFIX = "enrolled:"


def _line(record: dict) -> bytes:
    payload = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(payload.encode()):08x} {payload}\n".encode()


def _parse(line: bytes) -> dict | None:
    try:
        crc, payload = line.rstrip(b"\n").split(b" ", 1)
        if int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("op") in ("add", "del") else None


def read_log(path: str) -> tuple[list[dict], int]:
    """The log's records and the byte length of its intact part.

    Raises CheckpointError for a damaged record that is not the last one.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return [], 0
    records, good = [], 0
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    for number, raw in enumerate(complete, 1):
        record = _parse(raw + b"\n")
        if record is None:
            if number == len(complete) and not tail:
                log.warning("dropping a torn last record of %s (never acknowledged)", path)
                break
            raise CheckpointError(f"{path}: record {number} is damaged; the gallery log "
                                  f"cannot be replayed (restore it from a backup, or remove it "
                                  f"to fall back to the last saved index)")
        records.append(record)
        good += len(raw) + 1
    return records, good


class Gallery:
    """An index that takes enrolments and deletions durably; every method is thread-safe."""

    def __init__(self, workdir: str, index: SearchIndex, index_dir: str, compact_every: int):
        self.index = index
        self.index_dir = index_dir
        self.dir = os.path.join(workdir, GALLERY_DIR)
        self.images_dir = os.path.join(self.dir, IMAGES_DIR)
        self.log_path = os.path.join(self.dir, LOG_NAME)
        self.compact_every = compact_every
        self.lock = threading.RLock()
        self.pending = 0  # log records not yet in the saved index
        names = self.index.info.get("label_names")
        self.names: list[str] = list(names) if isinstance(names, list) else []
        self._label_of = {n: i for i, n in enumerate(self.names)}
        self._row_of: dict[int, int] = {}
        self._reindex()

    @classmethod
    def open(cls, workdir: str, index_dir: str, expect: Mapping[str, Any],
             compact_every: int = 1000) -> Gallery:
        """Loads the saved index (checked against the embedder `expect`) and replays the log."""
        if recover_dir(index_dir):
            log.warning("%s was being replaced when the last process stopped; restored the "
                        "previous copy (the log replays what came after)", index_dir)
        gallery = cls(workdir, load_index(index_dir, expect=expect), index_dir, compact_every)
        gallery._replay()
        return gallery

    # -- reads

    @property
    def size(self) -> int:
        return self.index.size

    def _reindex(self) -> None:
        self._row_of = {int(i): r for r, i in enumerate(self.index.ids)}

    def label_name(self, label: int) -> str:
        return self.names[label] if 0 <= label < len(self.names) else ""

    def _item(self, row: int) -> dict:
        idx = self.index
        path = idx.paths[row]
        enrolled = path.startswith(ENROLLED_PREFIX)
        return dict(id=int(idx.ids[row]), label=self.label_name(int(idx.labels[row])),
                    source="enrolled" if enrolled else "dataset",
                    path="" if enrolled else path)

    def search(self, embeddings: np.ndarray, k: int) -> list[list[dict]]:
        """Top-k hits per query row, best first: [{id, label, source, path, score}]."""
        with self.lock:
            if self.index.size == 0:
                return [[] for _ in range(len(embeddings))]
            k_eff = min(k, self.index.size)
            rows, scores = self.index.search(embeddings, k_eff)
            return [[dict(self._item(int(r)), score=float(s)) for r, s in zip(rr, ss) if r >= 0]
                    for rr, ss in zip(rows, scores)]

    def items(self, label: str | None = None, offset: int = 0, limit: int = 100
              ) -> tuple[list[dict], int]:
        with self.lock:
            rows = np.arange(self.index.size)
            if label is not None:
                code = self._label_of.get(label, -2)
                rows = rows[self.index.labels == code]
            return [self._item(int(r)) for r in rows[offset:offset + limit]], len(rows)

    def identities(self) -> list[dict]:
        with self.lock:
            counts = np.bincount(self.index.labels[self.index.labels >= 0],
                                 minlength=len(self.names))
            return [dict(label=n, count=int(c)) for n, c in zip(self.names, counts) if c]

    def locate(self, item_id: int) -> tuple[str, str] | None:
        """("enrolled", file) or ("dataset", relative path) of a gallery item, or None."""
        with self.lock:
            row = self._row_of.get(int(item_id))
            if row is None:
                return None
            path = self.index.paths[row]
        if path.startswith(ENROLLED_PREFIX):
            return "enrolled", os.path.join(self.images_dir, path[len(ENROLLED_PREFIX):])
        return "dataset", path

    # -- writes

    def enrol(self, label: str, embeddings: np.ndarray, images: list[tuple[bytes, str]]
              ) -> list[int]:
        """Adds images (bytes, extension) with their embeddings under `label`; returns ids
        once the change is durable."""
        embeddings = np.asarray(embeddings, np.float32)
        if len(embeddings) != len(images) or not len(images):
            raise DataError(f"{len(images)} images but {len(embeddings)} embeddings")
        with self.lock:
            first = self.index.next_id
            ids = list(range(first, first + len(images)))
            os.makedirs(self.images_dir, exist_ok=True)
            names = []
            for i, (data, ext) in zip(ids, images):
                names.append(f"{i}.{ext}")
                write_file_atomic(os.path.join(self.images_dir, names[-1]), data)
            fsync_dir(self.images_dir)
            self._append([dict(op="add", id=i, label=label, file=name,
                               emb=base64.b64encode(e.tobytes()).decode())
                          for i, name, e in zip(ids, names, embeddings)])
            self._apply_add(ids, label, names, embeddings)
            self._maybe_compact(len(ids))
            return ids

    def delete(self, item_id: int) -> None:
        """Removes one item once the change is durable; KeyError if there is no such id."""
        with self.lock:
            if int(item_id) not in self._row_of:
                raise KeyError(item_id)
            self._append([dict(op="del", id=int(item_id))])
            self._apply_del(int(item_id))
            self._maybe_compact(1)

    def compact(self) -> None:
        """Saves the index with every change applied, then empties the log."""
        with self.lock:
            if not self.pending:
                return
            self.index.info["label_names"] = list(self.names)
            self.index.save(self.index_dir)
            if os.path.exists(self.log_path):
                with open(self.log_path, "wb") as f:
                    f.flush()
                    os.fsync(f.fileno())
            self.pending = 0

    def _maybe_compact(self, added: int) -> None:
        self.pending += added
        if self.pending >= self.compact_every:
            self.compact()

    def _append(self, records: list[dict]) -> None:
        os.makedirs(self.dir, exist_ok=True)
        new = not os.path.exists(self.log_path)
        with open(self.log_path, "ab") as f:
            f.write(b"".join(_line(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        if new:
            fsync_dir(self.dir)

    def _label_code(self, label: str) -> int:
        code = self._label_of.get(label)
        if code is None:
            code = len(self.names)
            self.names.append(label)
            self._label_of[label] = code
            self.index.info["label_names"] = list(self.names)
        return code

    def _apply_add(self, ids, label: str, files, embeddings) -> None:
        code = self._label_code(label)
        self.index.add(embeddings, [ENROLLED_PREFIX + f for f in files],
                       np.full(len(ids), code, np.int32), ids=ids)
        self._reindex()

    def _apply_del(self, item_id: int) -> None:
        located = self.locate(item_id)
        if self.index.size == 1:
            # SearchIndex refuses to become empty; a served gallery may (it can grow again).
            self.index = _emptied(self.index)
        else:
            self.index.remove([item_id])
        self._reindex()
        if located and located[0] == "enrolled":
            try:
                os.remove(located[1])
            except FileNotFoundError:
                pass

    def _replay(self) -> None:
        records, good = read_log(self.log_path)
        if os.path.exists(self.log_path) and good < os.path.getsize(self.log_path):
            with open(self.log_path, "r+b") as f:  # cut the torn tail before appending again
                f.truncate(good)
                os.fsync(f.fileno())
        applied = 0
        dim = self.index.dim
        for r in records:
            try:
                if r["op"] == "add":
                    if int(r["id"]) < self.index.next_id:
                        continue  # already in the saved index (or added and deleted since)
                    emb = np.frombuffer(base64.b64decode(r["emb"]), np.float32).reshape(1, dim)
                    self._apply_add([int(r["id"])], str(r["label"]), [str(r["file"])], emb)
                elif int(r["id"]) in self._row_of:
                    self._apply_del(int(r["id"]))
                else:
                    continue
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"{self.log_path}: cannot replay record {r.get('op')} "
                                      f"{r.get('id')}: {e}") from None
            applied += 1
        self.pending = len(records)
        if applied:
            log.info("replayed %d gallery changes from %s", applied, self.log_path)


def _emptied(index: SearchIndex) -> SearchIndex:
    """An exact index with no items that keeps `index`'s embedder, info and next_id."""
    return SearchIndex(np.zeros((0, index.dim), np.float32), [], np.zeros(0, np.int32),
                       np.zeros(0, np.int64), index.embedder, "exact", info=index.info,
                       next_id=index.next_id)
