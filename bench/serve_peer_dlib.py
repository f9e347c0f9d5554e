"""The serving peer: a minimal FastAPI app around dlib-bin's own face descriptor.

    .venv/bin/python bench/serve_peer_dlib.py --workdir runs/serve_dlib --port 8101
    .venv/bin/python bench/serve.py --workdir runs/serve_dlib      # starts it for the peer rows

What a straightforward Python service around dlib looks like, answering the same endpoint
shape as `scripts/serve.py` with THE SAME saved index (`workdir/index`):
- `POST /v1/search`, multipart file field `image` and form field `k` (default 10): the upload
  is decoded exactly as `search_workdir` decodes a query file (`decode_bytes` with the
  embedder's input_size and resize_mode, the run's data.max_pixels and `run_face_crop`) into a
  150 px chip, dlib-bin's `face_recognition_model_v1(...).compute_face_descriptor(chip)` gives
  its 128-d descriptor, which is L2-normalised like the index's embeddings, and
  `SearchIndex.search` returns `{"results": [{"rank", "id", "label", "score"}]}`;
- `GET /readyz`: 200 `{"ready": true}` once the model and index are loaded (uvicorn accepts no
  connection before that), `GET /healthz`: 200.
One uvicorn worker process, no batching: the fair single-process comparison with our service
on the same cores. Requests run in the threadpool (decoding overlaps); the dlib net is not
safe to call from two threads at once, so descriptor calls are serialised by a lock. Binds
127.0.0.1 only. The weights are `dlib_face_recognition_resnet_model_v1.dat` from the PyPI
package face_recognition_models (the [parity] extra), as in bench/embed_throughput.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import threading
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def dlib_weights() -> str:
    """The .dat file inside face_recognition_models (never imported: it needs pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("face_recognition_models is not installed (the [parity] extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL_FILE
    if not path.is_file():
        raise SystemExit(f"{path} is missing")
    return str(path)


class DlibSearch:
    """The loaded model, index and decode settings of one workdir."""

    def __init__(self, workdir: str):
        import dlib

        from facejax.retrieval.embed import read_embedder_meta
        from facejax.retrieval.index import load_index
        from facejax.retrieval.workdir import (EMBEDDER_DIR, INDEX_DIR, read_run_config,
                                               run_face_crop)

        t0 = time.perf_counter()
        config = read_run_config(workdir)
        meta = read_embedder_meta(os.path.join(workdir, EMBEDDER_DIR))
        if meta.get("model") != "dlib_resnet":
            raise SystemExit(f"{workdir} holds a {meta.get('model')} embedder; this peer needs "
                             f"a dlib_resnet run (its index holds dlib descriptors)")
        self.size, self.mode = int(meta["cache_size"]), meta["resize_mode"]
        if self.size != 150:
            raise SystemExit(f"dlib takes 150 px chips; the embedder was exported for "
                             f"{self.size} px")
        self.max_pixels = int(config.data.max_pixels)
        self.face_crop = run_face_crop(config, meta)
        self.index = load_index(os.path.join(workdir, INDEX_DIR), expect=meta)
        self.net = dlib.face_recognition_model_v1(dlib_weights())
        self.lock = threading.Lock()
        self.version = dlib.__version__
        self.search(np.zeros((150, 150, 3), np.uint8), 10)  # compiles the index's k=10 search
        self.load_s = time.perf_counter() - t0

    def decode(self, data: bytes) -> np.ndarray:
        from facejax.data.decode import decode_bytes

        return decode_bytes(data, self.size, self.mode, self.max_pixels, self.face_crop)

    def search(self, chip: np.ndarray, k: int) -> list[dict]:
        with self.lock:
            d = np.asarray(self.net.compute_face_descriptor(chip), np.float32)
        d /= max(float(np.linalg.norm(d)), 1e-12)
        rows, scores = self.index.search(d[None], k)
        return [dict(rank=rank, id=int(self.index.ids[r]), label=int(self.index.labels[r]),
                     score=float(s))
                for rank, (r, s) in enumerate(zip(rows[0], scores[0]), 1) if r >= 0]


def make_app(workdir: str):
    from contextlib import asynccontextmanager

    from facejax.errors import DataError

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        state["s"] = DlibSearch(workdir)
        s = state["s"]
        print(f"peer ready: dlib-bin {s.version}, gallery {s.index.size}, "
              f"loaded in {s.load_s:.1f}s", flush=True)
        yield

    app = FastAPI(lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message, "status": status}, status_code=status)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/readyz")
    def readyz():
        if "s" not in state:
            return error(503, "loading")
        return {"ready": True}

    @app.post("/v1/search")
    def search(image: UploadFile = File(...), k: int = Form(10)):
        s = state["s"]
        if not 1 <= k <= s.index.size:
            return error(400, f"k must be in [1, {s.index.size}], got {k}")
        try:
            chip = s.decode(image.file.read())
        except DataError as e:
            return error(400, f"cannot use the image: {e}")
        return {"results": s.search(chip, k), "k": k, "gallery_size": s.index.size}

    return app


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a dlib_resnet run with an index")
    p.add_argument("--port", type=int, default=8101)
    args = p.parse_args(argv)
    import uvicorn

    uvicorn.run(make_app(args.workdir), host="127.0.0.1", port=args.port, workers=1,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
