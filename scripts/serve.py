"""Serve a run's search over HTTP: a JSON API under /v1, a web page at /, /metrics.

  python scripts/serve.py --workdir runs/demo                # http://127.0.0.1:8000
  python scripts/serve.py --workdir RUN --host 0.0.0.0 --port 8080 --api_keys_file keys.txt
  python scripts/serve.py --workdir RUN --max_batch 32 --embed_workers 2   # e.g. on a GPU
  python scripts/serve.py --new_key                          # a key, and its keys-file line

Loads the run's exported embedder and index once, compiles the embedder for every batch size,
then reports ready (GET /readyz). Enrolments and deletions (which need an API key) are logged
to RUN/gallery/ and fsynced before they are acknowledged, and folded into RUN/index/ every
--compact_every changes and at shutdown. With no key configured, a key is made for this run
and printed. The OpenAPI page is at /docs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys

from facejax import cli, cpu_preset
from facejax.errors import ConfigError
from facejax.runlock import hold_workdir_lock
from facejax.serve.settings import ServeSettings


def parse(argv):
    d = ServeSettings()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="training run folder with embedder/ and index/")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max_batch", type=int, default=d.max_batch,
                   help="images per embedder call (dynamic batching)")
    p.add_argument("--embed_workers", type=int, default=d.embed_workers,
                   help="embedder calls at once (threads): one XLA:CPU call keeps ~1.2 cores "
                        "busy")
    p.add_argument("--max_wait_ms", type=float, default=d.max_wait_ms,
                   help="longest a query waits for others to share its batch")
    p.add_argument("--queue_size", type=int, default=d.queue_size,
                   help="queries waiting at once; more get 503 with Retry-After")
    p.add_argument("--max_upload_mb", type=float, default=d.max_upload_bytes / 2**20)
    p.add_argument("--max_pixels", type=int, default=d.max_pixels,
                   help="largest decoded image (width x height)")
    p.add_argument("--max_k", type=int, default=d.max_k)
    p.add_argument("--api_keys_file", default=None,
                   help="file of 'sha256:<hex>' lines (also $FACEJAX_API_KEYS: keys, "
                        "comma-separated)")
    p.add_argument("--auth_reads", action="store_true",
                   help="require the API key on search and read endpoints too")
    p.add_argument("--cors_origin", action="append", default=[],
                   help="allow browser calls from this origin (repeatable; default none)")
    p.add_argument("--compact_every", type=int, default=d.compact_every)
    p.add_argument("--log_level", default="warning")
    p.add_argument("--new_key", action="store_true", help="print a new API key and exit")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    cpu_preset.apply()  # XLA:CPU settings, before jax starts (FACEJAX_CPU_PRESET=0: off)
    args = parse(argv)
    from facejax.serve import auth

    if args.new_key:
        key, line = auth.new_key()
        print(f"key (give to clients):       {key}\nline (append to keys file):  {line}")
        return 0
    if not args.workdir:
        raise ConfigError("--workdir is required (a run folder with embedder/ and index/)")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: "
                                                             "%(message)s")
    settings = ServeSettings(
        max_batch=args.max_batch, embed_workers=args.embed_workers,
        max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
        max_k=args.max_k, auth_reads=args.auth_reads, cors_origins=tuple(args.cors_origin),
        compact_every=args.compact_every)
    keys = auth.ApiKeys.load(os.environ.get(auth.ENV_VAR), args.api_keys_file)
    made_key = None
    if not len(keys):
        made_key, _ = auth.new_key()
        keys.add(made_key)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except (OSError, OverflowError) as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    with contextlib.ExitStack() as stack:
        if os.path.isdir(args.workdir):  # (a missing run gets SearchService's own message)
            # The service writes the index and its log: no train, export or build_index of
            # this run meanwhile, and no second service.
            stack.enter_context(hold_workdir_lock(args.workdir, "serve"))
        return serve(args, settings, keys, made_key, sock, url)


def serve(args, settings, keys, made_key, sock, url) -> int:
    import uvicorn

    from facejax.serve.app import create_app
    from facejax.serve.service import SearchService

    service = SearchService(args.workdir, settings)
    print(f"facejax: serving {os.path.abspath(args.workdir)} ({service.gallery.size} gallery "
          f"items, {service.embedder.meta.get('model')}) at {url}", flush=True)
    if service.search_warning():
        print(f"**WARNING: {service.search_warning()}**", flush=True)
    if made_key:
        print(f"facejax: no API key configured; this run's key for writes: {made_key}\n"
              f"         (set $FACEJAX_API_KEYS or --api_keys_file to choose keys)", flush=True)
    failed = []

    def on_ready(seconds, error):
        if error is not None:
            failed.append(error)
            print(f"error: the embedder could not be compiled: {error}", file=sys.stderr,
                  flush=True)
            server.should_exit = True
        else:
            print(f"facejax: ready in {seconds:.1f} s: {url}/ (API {url}/docs)", flush=True)

    server = uvicorn.Server(uvicorn.Config(create_app(service, keys, on_ready=on_ready),
                                           log_level=args.log_level, access_log=False))
    server.run(sockets=[sock])
    return 2 if failed else 0


if __name__ == "__main__":
    cli.run(main)
