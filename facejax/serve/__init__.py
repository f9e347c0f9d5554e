"""The search service: a long-running process that answers "who is this?" over HTTP.

It is a thin layer over the run's exported embedder and saved index (the same ones the scripts
use): `service.SearchService` loads them once, `batcher.Batcher` gathers concurrent queries into
one embedder call, `gallery.Gallery` owns the index and its durable change log, and `app` is the
FastAPI application (JSON API under /v1, the page at /, Prometheus /metrics).
"""
