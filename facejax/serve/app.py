"""The HTTP layer: FastAPI routes under /v1, the page at /, /healthz, /readyz, /metrics.

Every error is JSON `{"error": message, "status": code}`; a bad request gets a 4xx, never a
traceback. Request bodies are bounded before they are read (`_Guard`), uploads are decoded by
content with a pixel limit (`uploads.py`), and no request value ever becomes a file path:
images are served by gallery id only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from facejax.errors import ConfigError, FacejaxError
from facejax.serve.auth import ApiKeys
from facejax.serve.batcher import Overloaded
from facejax.serve.service import ExplainBusy, SearchService
from facejax.serve.uploads import UploadError, sniff

log = logging.getLogger(__name__)

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
API_VERSION = "v1"
_UPLOAD_PATHS = ("/v1/search", "/v1/verify", "/v1/gallery", "/v1/explain")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
# The page runs no inline script and loads nothing from elsewhere. (/docs is left out: the
# OpenAPI page that FastAPI writes starts itself with an inline script.)
_PAGE_CSP = (b"content-security-policy",
             b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
             b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status,
                        headers=headers)


def _endpoint(path: str) -> str:
    """The route a path belongs to, for metric labels (ids folded, unknown paths 'other')."""
    path = re.sub(r"/\d+$", "/{id}", path)
    known = ("/", "/healthz", "/readyz", "/metrics", "/v1/info", "/v1/search", "/v1/verify",
             "/v1/explain", "/v1/gallery", "/v1/gallery/{id}", "/v1/identities", "/v1/images/{id}")
    if path in known:
        return path
    return "/static" if path.startswith("/static/") else "other"


class _Guard:
    """ASGI middleware: bounds request bodies and upload requests in flight, adds security
    headers, and records each request in the metrics."""

    def __init__(self, app, service: SearchService):
        self.app, self.service = app, service
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s, m = self.service.settings, self.service.metrics
        endpoint = _endpoint(scope["path"])
        t0 = time.perf_counter()
        state = dict(status=500, started=False, too_large=False)

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                if state["too_large"]:
                    return
                state["started"], state["status"] = True, message["status"]
                extra = _SECURITY_HEADERS + ([] if endpoint == "other" else [_PAGE_CSP])
                message["headers"] = list(message.get("headers", [])) + extra
            elif state["too_large"]:
                return
            await send(message)

        async def reply(response):
            state["too_large"] = False
            await response(scope, receive, send_wrapped)

        limit = s.max_upload_bytes + 64 * 1024  # the files plus the form's own fields
        length = dict(scope.get("headers", [])).get(b"content-length")
        upload = scope["method"] == "POST" and scope["path"] in _UPLOAD_PATHS
        try:
            if length is not None and (not length.isdigit() or int(length) > limit):
                return await reply(_error(413, f"the request body is over the limit of "
                                               f"{s.max_upload_bytes} bytes of images"))
            if upload and self.in_flight >= s.queue_size:
                m.rejected.inc()
                return await reply(_error(503, "the service is at capacity; retry shortly",
                                          {"Retry-After": "1"}))
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        state["too_large"] = True
                        return {"type": "http.disconnect"}
                return message

            self.in_flight += upload
            try:
                await self.app(scope, receive_limited, send_wrapped)
            except Exception:
                if not state["too_large"]:
                    raise
            finally:
                self.in_flight -= upload
            if state["too_large"] and not state["started"]:
                await reply(_error(413, f"the request body is over the limit of "
                                        f"{s.max_upload_bytes} bytes of images"))
        finally:
            m.requests.labels(endpoint, str(state["status"])).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)


def create_app(service: SearchService, keys: ApiKeys, on_ready=None) -> FastAPI:
    """The application. It answers /healthz at once; the embedder compiles in the background
    and /readyz turns 200 after, when `on_ready(seconds, error)` is called."""
    s = service.settings

    async def warm_up():
        try:
            t0 = time.perf_counter()
            await asyncio.to_thread(service.warm_up)
            # A few queries along the request path itself (threadpool decode, batcher, search),
            # so the first real query finds every thread started and every cache warm.
            sample = service.sample_image()
            for _ in range(3):
                image = await run_in_threadpool(service.decode, sample, "warm-up image")
                await service.batcher.submit(image, 10)
            service.ready = True
            seconds, error = time.perf_counter() - t0, None
        except Exception as e:  # noqa: BLE001 - reported to the caller, which stops serving
            log.exception("warm-up failed")
            seconds, error = 0.0, e
        if on_ready is not None:
            on_ready(seconds, error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warm = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            await warm
            await asyncio.to_thread(service.close)

    # FastAPIOffline serves the /docs and /redoc assets itself (FastAPI's come from a CDN).
    app = FastAPIOffline(title="facejax search service", version=API_VERSION,
                         lifespan=lifespan,
                         description="Search a gallery of images (faces first) by example.")
    if s.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(s.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(_Guard, service=service)

    # -- errors: always JSON, never a traceback

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(UploadError)
    async def _upload_error(request, e: UploadError):
        return _error(e.status, e.message)

    @app.exception_handler(Overloaded)
    async def _overloaded(request, e):
        service.metrics.rejected.inc()
        return _error(503, "the service is at capacity; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); see the server log")

    # -- helpers

    def key_of(request: Request) -> str | None:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        return key

    def need_key(request: Request) -> None:
        key = key_of(request)
        if not key:
            raise ApiError(401, "this endpoint needs an API key (header X-API-Key)",
                           {"WWW-Authenticate": "Bearer"})
        if not keys.check(key):
            raise ApiError(403, "the API key is not valid")

    def need_read(request: Request) -> None:
        if s.auth_reads:
            need_key(request)

    def need_ready() -> None:
        if not service.ready:
            raise ApiError(503, "the service is still starting (compiling the embedder)",
                           {"Retry-After": "2"})

    async def read_upload(f: UploadFile, what: str) -> bytes:
        data = await f.read(s.max_upload_bytes + 1)
        if len(data) > s.max_upload_bytes:
            raise UploadError(413, f"{what} is over the limit of {s.max_upload_bytes} bytes")
        return data

    async def embed(data: bytes, what: str, k: int = 0, align: bool = False):
        with service.batcher.admit():
            t0 = time.perf_counter()
            image = await run_in_threadpool(service.decode, data, what, align)
            decoded = time.perf_counter() - t0
        return await service.batcher.submit(image, k), decoded

    def describe(f: UploadFile, i: int | None = None) -> str:
        name = _CONTROL.sub("", f.filename or "")[:80]
        where = "image" if i is None else f"images[{i}]"
        return f"{where} ({name})" if name else where

    # -- endpoints

    @app.get("/healthz", tags=["service"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["service"])
    async def readyz():
        if not service.ready:
            return _error(503, "starting: compiling the embedder", {"Retry-After": "2"})
        return {"ready": True, "gallery_size": service.gallery.size}

    @app.get("/metrics", tags=["service"])
    async def metrics():
        return Response(service.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(f"/{API_VERSION}/info", tags=["search"])
    async def info(request: Request):
        need_read(request)
        return service.info()

    @app.post(f"/{API_VERSION}/search", tags=["search"])
    async def search(request: Request, image: UploadFile = File(..., description="the query"),
                     k: int = Form(10, description="results to return"),
                     min_score: float | None = Form(None, description="drop results below"),
                     align: bool = Form(False, description="align a raw photo's face first")):
        """The k gallery images most similar to the uploaded one, best first."""
        need_read(request)
        need_ready()
        if not 1 <= k <= s.max_k:
            raise ApiError(422, f"k must be between 1 and {s.max_k}, got {k}")
        if min_score is not None and not np.isfinite(min_score):
            raise ApiError(422, "min_score must be a finite number")
        t0 = time.perf_counter()
        data = await read_upload(image, describe(image))
        answer, decoded = await embed(data, describe(image), k=k, align=align)
        hits = answer.hits or []
        if min_score is not None:
            hits = [h for h in hits if h["score"] >= min_score]
        results = [dict(rank=rank, **h, image_url=f"/{API_VERSION}/images/{h['id']}")
                   for rank, h in enumerate(hits, 1)]
        ms = lambda x: round(1000 * x, 3)
        return dict(results=results, k=k, threshold=service.match_threshold,
                    gallery_size=service.gallery.size, batch_size=answer.batch_size,
                    timings_ms=dict(decode=ms(decoded), queue=ms(answer.queue_s),
                                    embed=ms(answer.embed_s), search=ms(answer.search_s),
                                    total=ms(time.perf_counter() - t0)))

    @app.post(f"/{API_VERSION}/verify", tags=["search"])
    async def verify(request: Request, image_a: UploadFile = File(...),
                     image_b: UploadFile = File(...), align: bool = Form(False)):
        """Are two images of the same identity? Cosine score, and same/different when the run
        has a calibrated threshold (scripts/eval_verification.py)."""
        need_read(request)
        need_ready()
        a = await read_upload(image_a, "image_a")
        b = await read_upload(image_b, "image_b")
        (ans_a, _), (ans_b, _) = await asyncio.gather(embed(a, "image_a", align=align),
                                                      embed(b, "image_b", align=align))
        ea, eb = ans_a.embedding, ans_b.embedding
        score = float(np.dot(ea, eb) / max(np.linalg.norm(ea) * np.linalg.norm(eb), 1e-12))
        t = service.threshold
        out = dict(score=score, threshold=t, same=None if t is None else score >= t,
                   threshold_source=service.threshold_source)
        if t is None:
            out["note"] = ("this run has no calibrated threshold: run scripts/"
                           "eval_verification.py --workdir RUN to calibrate one")
        return out

    @app.post(f"/{API_VERSION}/explain", tags=["search"])
    async def explain(request: Request, image: UploadFile = File(..., description="the query"),
                      id: int = Form(..., description="the gallery id of a result"),
                      method: str = Form("auto", description="auto, similarity or occlusion"),
                      align: bool = Form(False, description="align a raw photo's face first")):
        """Why does gallery item `id` match the uploaded query? Two heatmaps (PNG data URLs):
        red where a region raises the cosine. `similarity` maps need the run's checkpoint and
        a pooled conv model; `occlusion` works for any model (slower); `auto` picks."""
        need_read(request)
        need_ready()
        if method not in ("auto", "similarity", "occlusion"):
            raise ApiError(422, f"method must be auto, similarity or occlusion, got {method!r}")
        data = await read_upload(image, describe(image))
        with service.batcher.admit():
            query = await run_in_threadpool(service.decode, data, describe(image), align)
        try:
            out = await run_in_threadpool(service.explain, query, id, method)
        except ExplainBusy:
            raise ApiError(503, "another explanation is being computed; retry shortly",
                           {"Retry-After": "2"}) from None
        except ConfigError as e:
            raise ApiError(422, str(e)) from None
        except FacejaxError as e:
            raise ApiError(409, f"this run cannot be explained: {e}") from None
        if out is None:
            raise ApiError(404, f"no gallery item with id {id}")
        return out

    @app.post(f"/{API_VERSION}/gallery", tags=["gallery"])
    async def enrol(request: Request, label: str = Form(..., description="identity name"),
                    images: list[UploadFile] = File(..., description="one or more images")):
        """Adds images under `label`; they are searchable as soon as this returns."""
        need_key(request)
        need_ready()
        label = label.strip()
        if not label or len(label) > s.max_label_chars or _CONTROL.search(label):
            raise ApiError(422, f"label must be 1-{s.max_label_chars} printable characters")
        if len(images) > s.max_files:
            raise ApiError(413, f"at most {s.max_files} images per request, got {len(images)}")
        datas = []
        for i, f in enumerate(images):
            datas.append(await read_upload(f, describe(f, i)))
        answers = await asyncio.gather(*(embed(d, describe(f, i))
                                         for i, (d, f) in enumerate(zip(datas, images))))
        exts = [sniff(d) for d in datas]
        emb = np.stack([a.embedding for a, _ in answers])
        ids = await run_in_threadpool(service.gallery.enrol, label, emb,
                                      list(zip(datas, exts)))
        return dict(label=label, ids=ids, gallery_size=service.gallery.size)

    @app.delete(f"/{API_VERSION}/gallery/{{item_id}}", tags=["gallery"])
    async def delete(request: Request, item_id: int):
        need_key(request)
        try:
            await run_in_threadpool(service.gallery.delete, item_id)
        except KeyError:
            raise ApiError(404, f"no gallery item with id {item_id}") from None
        return dict(deleted=item_id, gallery_size=service.gallery.size)

    @app.get(f"/{API_VERSION}/gallery", tags=["gallery"])
    async def gallery(request: Request, label: str | None = None,
                      offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)):
        need_read(request)
        items, total = service.gallery.items(label, offset, limit)
        for it in items:
            it["image_url"] = f"/{API_VERSION}/images/{it['id']}"
        return dict(items=items, total=total, offset=offset, limit=limit)

    @app.get(f"/{API_VERSION}/identities", tags=["gallery"])
    async def identities(request: Request):
        need_read(request)
        found = service.gallery.identities()
        return dict(identities=found, total=len(found))

    @app.get(f"/{API_VERSION}/images/{{item_id}}", tags=["gallery"])
    async def image(request: Request, item_id: int,
                    size: int = Query(s.thumb_size, ge=16, le=512)):
        """A gallery item's thumbnail (JPEG), by id only."""
        need_read(request)
        data = await run_in_threadpool(service.thumbnail, item_id, size)
        if data is None:
            raise ApiError(404, f"no image for gallery item {item_id}")
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    # -- the page

    @app.get("/", include_in_schema=False)
    async def page():
        index = os.path.join(STATIC_DIR, "index.html")
        if not os.path.isfile(index):
            raise ApiError(404, "the web page is not installed; the API is at /docs")
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    if os.path.isdir(STATIC_DIR):
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app

