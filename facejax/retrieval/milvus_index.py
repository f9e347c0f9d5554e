"""Milvus backend of `SearchIndex`: the gallery in a Milvus collection (Lite, standalone, cluster).

`index.milvus_uri` picks the deployment:
  - a local path ending in `.db` is Milvus Lite (the `milvus-lite` package): embedded in this
    process, no server; the default for tests and one machine. milvus-lite 3.2 is a pure-Python
    engine with FLAT (brute force, NumPy) and, through faiss-cpu, HNSW, HNSW_SQ, IVF_FLAT and
    IVF_SQ8; it has no SCANN and no IVF_PQ. facejax uses FLAT there (exact results) unless
    `index.milvus_index` names another type. One process at a time opens a Lite database.
  - `http://host:19530` (or https://, tcp://) is a Milvus standalone or cluster deployment,
    which shards, replicates and builds the index itself. The index type follows the gallery
    size (`server_index`): FLAT below 100k items, HNSW to 2M, SCANN to 500M, IVF_PQ above.

The collection holds one row per gallery item: `id` (INT64 primary key, the index's stable
id), `embedding` (FLOAT_VECTOR), `label` (INT32) and `path` (VARCHAR). Its properties record
the embedder's params hash and the build's token, and the index's manifest records the URI,
collection, index type and token: a collection rebuilt by another embedder or another build is
refused on load. The `SearchIndex` keeps its local copy of the arrays (the manifest's files):
it answers exact queries (recall against exact search), lists the gallery, and repairs a
collection that missed changes (a service stopped between a write and its compaction).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping

import numpy as np

from facejax.errors import CheckpointError, ConfigError, DataError

# Index types this module knows how to parameterise ("auto": by gallery size and deployment).
INDEX_TYPES = ("auto", "FLAT", "HNSW", "IVF_FLAT", "IVF_PQ", "SCANN")
# Milvus caps a search's limit (top-k) at 16,384 and a request's size; rows per insert call
# and queries per search call stay well under the 64 MB gRPC message limit at any dim <= 4096.
MAX_K = 16_384
# What milvus-lite 3.2 builds of INDEX_TYPES (index/factory.py: IVF_PQ is "reserved", SCANN
# unknown).
LITE_TYPES = ("FLAT", "HNSW", "IVF_FLAT")
_INSERT_ROWS = 4096
_SEARCH_ROWS = 1024
_MAX_PATH = 65_535
# Seconds to wait for a server before giving up with one line (the URI is unreachable).
CONNECT_TIMEOUT = 10.0
_PROP_EMBEDDER = "facejax.embedder"
_PROP_TOKEN = "facejax.index_token"
_FIX = "rebuild it with scripts/build_index.py"


def is_lite(uri: str) -> bool:
    """A local `.db` path (Milvus Lite) rather than a server URI."""
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def check_uri(uri) -> str:
    """Raises ConfigError unless `uri` is a server URI or a local path ending in `.db`."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError("index.backend=milvus needs index.milvus_uri: a local path ending in "
                          ".db (Milvus Lite) or http://host:19530 (a Milvus server)")
    if is_lite(uri) and (not uri.endswith(".db") or "://" in uri):
        raise ConfigError(f"index.milvus_uri={uri!r} is neither a local path ending in .db "
                          f"(Milvus Lite) nor an http://, https:// or tcp:// server address")
    return uri


def check_index_type(index_type) -> str:
    if index_type not in INDEX_TYPES:
        raise ConfigError(f"index.milvus_index must be one of {INDEX_TYPES}, got {index_type!r}")
    return index_type


# Milvus builds one index per sealed segment (dataCoord.segment.maxSize, 1 GB by default), so
# list counts follow the rows of a segment, not of the collection.
_SEGMENT_BYTES = 1 << 30


def _lists(n: int, dim: int) -> tuple[int, int]:
    """(nlist, nprobe) for IVF-style indexes: ~4*sqrt(rows per segment) lists, ~1.5% probed."""
    rows = max(1, min(n, _SEGMENT_BYTES // (4 * dim)))
    nlist = int(min(65_536, max(16, 4 * round(math.sqrt(rows)))))
    return nlist, max(8, nlist // 64)


def server_index(n: int, dim: int, k: int = 10) -> tuple[str, dict, dict]:
    """(index type, build params, search params) for a Milvus server holding `n` vectors.

    - n < 100k: FLAT. Exact; one query reads n*dim*4 bytes (51 MB at 100k x 128).
    - n < 2M: HNSW (M=16, efConstruction=200, ef=max(64, 4k)): high recall, but the graph
      and the float32 vectors stay in RAM (~0.63 KB per 128-d vector, faiss's M16 at 1M).
    - n < 500M: SCANN (Milvus's IVF + 4-bit fast-scan PQ, raw vectors kept for the reorder,
      reorder_k = 8k): ~0.55 KB per 128-d vector in the query nodes' RAM.
    - above: IVF_PQ (dim/8 bytes per vector, 8-bit codes): the raw vectors leave the query
      nodes' RAM (16 B instead of ~0.55 KB per 128-d vector) at a recall cost (PQ codes only,
      no reorder); index.milvus_index=SCANN keeps the reorder where RAM allows (SCALE.md).
    IVF lists follow the rows of one segment (`_lists`). The thresholds come from memory per
    vector (SCALE.md); they are not tuned on a server here (none is reachable from this
    machine), so measure recall on yours: build_index.py prints it.
    """
    if n < 100_000:
        return "FLAT", {}, {}
    if n < 2_000_000:
        return "HNSW", dict(M=16, efConstruction=200), dict(ef=max(64, 4 * k))
    if n < 500_000_000:
        return _typed("SCANN", n, dim, k)
    return _typed("IVF_PQ", n, dim, k)


def _typed(index_type: str, n: int, dim: int, k: int) -> tuple[str, dict, dict]:
    """Build and search parameters of one named index type."""
    nlist, nprobe = _lists(n, dim)
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    params = dict(FLAT=({}, {}),
                  HNSW=(dict(M=16, efConstruction=200), dict(ef=max(64, 4 * k))),
                  IVF_FLAT=(dict(nlist=nlist), dict(nprobe=nprobe)),
                  IVF_PQ=(dict(nlist=nlist, m=m, nbits=8), dict(nprobe=nprobe)),
                  SCANN=(dict(nlist=nlist, with_raw_data=True),
                         dict(nprobe=nprobe, reorder_k=8 * k)))
    return index_type, *params[index_type]


def pick_index(uri: str, index_type: str, n: int, dim: int, k: int = 10
               ) -> tuple[str, dict, dict]:
    """The index for this deployment: Lite uses FLAT unless told otherwise (see module doc)."""
    check_index_type(index_type)
    if index_type == "auto":
        return server_index(n, dim, k) if not is_lite(uri) else ("FLAT", {}, {})
    if is_lite(uri) and index_type not in LITE_TYPES:
        # Milvus Lite accepts the collection, then fails to build the index in the background.
        raise ConfigError(f"Milvus Lite has no {index_type} index (it builds {LITE_TYPES}); "
                          f"use one of those, or a Milvus server for {index_type}")
    return _typed(index_type, n, dim, k)


def _message(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e) or type(e).__name__
    return " ".join(str(msg).split())[:300]


def connect(uri: str, timeout: float = CONNECT_TIMEOUT):
    """A MilvusClient for `uri`; ConfigError (one line) when it cannot be opened or reached."""
    check_uri(uri)
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise ConfigError("index.backend=milvus needs pymilvus and milvus-lite: "
                          "pip install -e '.[milvus]'") from None
    if is_lite(uri):
        parent = os.path.dirname(os.path.abspath(uri))
        if not os.path.isdir(parent):
            raise ConfigError(f"index.milvus_uri={uri}: the folder {parent} does not exist")
    try:
        return MilvusClient(uri=uri, timeout=timeout)
    except Exception as e:  # noqa: BLE001  (pymilvus raises MilvusException and gRPC errors)
        if is_lite(uri):
            raise ConfigError(f"cannot open the Milvus Lite database {uri} ({_message(e)}); "
                              f"Milvus Lite serves one process at a time: stop the other "
                              f"one, or use a Milvus server") from None
        raise ConfigError(f"cannot reach Milvus at {uri} ({_message(e)}); start the server or "
                          f"fix index.milvus_uri") from None


def default_collection(workdir: str) -> str:
    """A collection name of one run folder: `facejax_` + a hash of its absolute path."""
    import hashlib

    h = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]
    return f"facejax_{h}"


def check_collection_name(name) -> str:
    ok = (isinstance(name, str) and 0 < len(name) <= 255 and (name[0].isalpha() or name[0] == "_")
          and all(c.isalnum() or c == "_" for c in name) and name.isascii())
    if not ok:
        raise ConfigError(f"index.milvus_collection must be letters, digits and underscores, "
                          f"starting with a letter or _, got {name!r}")
    return name


class MilvusStore:
    """One facejax gallery in one Milvus collection: build, open, search, upsert, delete."""

    def __init__(self, client, uri: str, collection: str, index_type: str, index_params: dict,
                 search_params: dict, token: str):
        self.client = client
        self.uri = uri
        self.collection = collection
        self.index_type = index_type
        self.index_params = dict(index_params)
        self.search_params = dict(search_params)
        self.token = token

    # -- construction

    @classmethod
    def create(cls, uri: str, collection: str, embeddings: np.ndarray, ids: np.ndarray,
               labels: np.ndarray, paths, embedder_hash: str, *, index_type: str = "auto",
               k: int = 10) -> MilvusStore:
        """A new collection holding the gallery; replaces an earlier facejax collection of
        that name, refuses to touch one that facejax did not make."""
        check_collection_name(collection)
        n, dim = embeddings.shape
        itype, iparams, sparams = pick_index(uri, index_type, n, dim, k)
        client = connect(uri)
        try:
            from pymilvus import DataType, MilvusClient

            if client.has_collection(collection):
                props = client.describe_collection(collection).get("properties") or {}
                if _PROP_TOKEN not in props:
                    raise ConfigError(f"Milvus collection {collection} at {uri} exists and was "
                                      f"not made by facejax; set index.milvus_collection to "
                                      f"another name")
                client.drop_collection(collection)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=int(dim))
            schema.add_field("label", DataType.INT32)
            schema.add_field("path", DataType.VARCHAR, max_length=_MAX_PATH)
            index_params = client.prepare_index_params()
            index_params.add_index(field_name="embedding", index_type=itype, metric_type="IP",
                                   params=iparams)
            token = uuid.uuid4().hex
            client.create_collection(collection, schema=schema, index_params=index_params,
                                     consistency_level="Strong",
                                     properties={_PROP_EMBEDDER: str(embedder_hash),
                                                 _PROP_TOKEN: token})
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"Milvus at {uri} refused to create collection {collection} "
                              f"with a {itype} index ({_message(e)})") from None
        store = cls(client, uri, collection, itype, iparams, sparams, token)
        store.upsert(ids, embeddings, labels, paths)
        # Seal what was written, so that it is indexed rather than scanned as growing data.
        store._call("flush", client.flush, collection)
        return store

    @classmethod
    def open(cls, spec: Mapping, embedder_hash: str, uri: str | None = None) -> MilvusStore:
        """The collection a manifest's `milvus` section names, checked against its embedder
        hash and build token; `uri` (resolved by the caller) overrides the manifest's."""
        uri = uri or spec.get("uri")
        collection = spec.get("collection")
        if is_lite(str(uri)) and not os.path.exists(str(uri)):
            raise CheckpointError(f"the Milvus Lite database {uri} of this index is missing; "
                                  f"{_FIX}")
        client = connect(uri)
        try:
            if not client.has_collection(collection):
                raise CheckpointError(f"Milvus at {uri} has no collection {collection}: it was "
                                      f"dropped, or this is another server; {_FIX}")
            props = client.describe_collection(collection).get("properties") or {}
            client.load_collection(collection)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"Milvus at {uri}: cannot open collection {collection} "
                              f"({_message(e)})") from None
        have = props.get(_PROP_EMBEDDER)
        if have != str(embedder_hash):
            raise CheckpointError(f"Milvus collection {collection} at {uri} holds embeddings of "
                                  f"another embedder (params_hash {str(have)[:12]}, this index: "
                                  f"{str(embedder_hash)[:12]}); {_FIX}")
        if props.get(_PROP_TOKEN) != spec.get("token"):
            raise CheckpointError(f"Milvus collection {collection} at {uri} was rebuilt by "
                                  f"another index build since this index was saved; {_FIX}, "
                                  f"or give each index its own index.milvus_collection")
        return cls(client, uri, collection, spec.get("index_type", "FLAT"),
                   spec.get("index_params") or {}, spec.get("search_params") or {},
                   spec["token"])

    def spec(self) -> dict:
        return dict(uri=self.uri, collection=self.collection, index_type=self.index_type,
                    index_params=self.index_params, search_params=self.search_params,
                    token=self.token, deployment="lite" if is_lite(self.uri) else "server")

    # -- data

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"Milvus at {self.uri}, collection {self.collection}: {what} "
                              f"failed ({_message(e)})") from None

    def upsert(self, ids, embeddings, labels, paths) -> None:
        ids = np.asarray(ids, np.int64)
        embeddings = np.asarray(embeddings, np.float32)
        labels = np.asarray(labels, np.int32)
        long = [p for p in paths if len(p.encode()) > _MAX_PATH]
        if long:
            raise DataError(f"a gallery path is longer than Milvus's {_MAX_PATH} bytes: "
                            f"{long[0][:80]}...")
        for s in range(0, len(ids), _INSERT_ROWS):
            rows = [dict(id=int(i), embedding=e, label=int(lab), path=str(p))
                    for i, e, lab, p in zip(ids[s:s + _INSERT_ROWS],
                                            embeddings[s:s + _INSERT_ROWS],
                                            labels[s:s + _INSERT_ROWS],
                                            paths[s:s + _INSERT_ROWS])]
            self._call("upsert", self.client.upsert, self.collection, rows)

    def delete(self, ids) -> None:
        ids = [int(i) for i in np.asarray(ids, np.int64)]
        for s in range(0, len(ids), _INSERT_ROWS):
            self._call("delete", self.client.delete, self.collection, ids=ids[s:s + _INSERT_ROWS])

    def count(self) -> int:
        res = self._call("count", self.client.query, self.collection, filter="",
                         output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def all_ids(self) -> np.ndarray:
        it = self._call("listing ids", self.client.query_iterator, self.collection,
                        batch_size=10_000, filter="id >= 0", output_fields=["id"])
        out = []
        while True:
            batch = self._call("listing ids", it.next)
            if not batch:
                break
            out.extend(int(r["id"]) for r in batch)
        it.close()
        return np.asarray(out, np.int64)

    def sync(self, ids, embeddings, labels, paths) -> int:
        """Makes the collection hold exactly `ids` (the saved index); returns rows changed."""
        ids = np.asarray(ids, np.int64)
        if self.count() == len(ids):
            return 0
        have = self.all_ids()
        extra = np.setdiff1d(have, ids)
        missing = ~np.isin(ids, have)
        if len(extra):
            self.delete(extra)
        if missing.any():
            self.upsert(ids[missing], embeddings[missing], np.asarray(labels)[missing],
                        [p for p, m in zip(paths, missing) if m])
        return int(len(extra) + missing.sum())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids (int64 [Q,k], -1 where fewer than k were found) and inner products, best first."""
        if k > MAX_K:
            raise DataError(f"k={k}: Milvus returns at most {MAX_K} results per query")
        q = np.asarray(queries, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        scores = np.full((len(q), k), -np.inf, np.float32)
        params = dict(metric_type="IP", params=self.search_params)
        for s in range(0, len(q), _SEARCH_ROWS):
            hits = self._call("search", self.client.search, self.collection,
                              data=list(q[s:s + _SEARCH_ROWS]), limit=k, anns_field="embedding",
                              search_params=params, output_fields=["id"])
            for j, row in enumerate(hits):
                for r, h in enumerate(row):
                    ids[s + j, r] = int(h["id"])
                    scores[s + j, r] = float(h["distance"])
        return ids, scores

    def drop(self) -> None:
        self._call("drop", self.client.drop_collection, self.collection)


# ----------------------------------------------------------------------------- SearchIndex glue

def rows_of(store: MilvusStore, found: np.ndarray, index_ids: np.ndarray) -> np.ndarray:
    """Row positions in `index_ids` of the ids Milvus returned (-1 stays -1)."""
    if getattr(store, "_ids_seen", None) is not index_ids:
        store._sorter = np.argsort(index_ids, kind="stable")
        store._ids_seen = index_ids
    sorted_ids = index_ids[store._sorter]
    pos = np.clip(np.searchsorted(sorted_ids, found), 0, max(0, len(sorted_ids) - 1))
    rows = store._sorter[pos] if len(sorted_ids) else np.zeros_like(found)
    ok = (found < 0) | (len(sorted_ids) > 0) & (sorted_ids[pos] == found)
    if not ok.all():
        bad = found[~ok][0]
        raise CheckpointError(f"Milvus collection {store.collection} returned id {bad}, which "
                              f"this index does not hold; {_FIX}")
    return np.where(found < 0, -1, rows).astype(np.int64)


def measure_recall(index, k: int = 10, num_queries: int = 1000, seed: int = 0) -> dict:
    """recall@k of the Milvus search against exact search on gallery items, leave-one-out."""
    from facejax.retrieval.index import drop_self
    from facejax.retrieval.metrics import ann_recall_at_k

    k = min(k, index.size - 1)
    if k < 1:
        return dict(k=k, recall=1.0, num_queries=0)
    rng = np.random.default_rng(seed)
    self_rows = np.sort(rng.choice(index.size, size=min(num_queries, index.size), replace=False))
    q = index.embeddings[self_rows]
    truth = drop_self(*index.search(q, k + 1, exact=True), self_rows, k)[0]
    served = drop_self(*index.search(q, k + 1), self_rows, k)[0]
    return dict(k=int(k), recall=round(float(ann_recall_at_k(served, truth, k)), 5),
                num_queries=int(len(q)), queries="gallery items, leave-one-out")


def build_for(index, options: Mapping, k: int, seed: int) -> MilvusStore:
    """Creates the collection of a freshly built `SearchIndex` and measures its recall."""
    options = dict(options or {})
    uri = check_uri(options.get("uri", ""))
    store = MilvusStore.create(
        uri if not is_lite(uri) else os.path.abspath(uri),
        check_collection_name(options.get("collection") or f"facejax_{uuid.uuid4().hex[:16]}"),
        index.embeddings, index.ids, index.labels, index.paths,
        index.embedder.get("params_hash") or "", index_type=options.get("index_type", "auto"),
        k=k)
    index._milvus = store
    if index.size >= 2:
        store.recall = measure_recall(index, k=k, seed=seed)
    return store


def manifest_spec(store: MilvusStore, index_dir: str) -> dict:
    """The manifest's `milvus` section; a Lite database is also recorded relative to the index
    folder, so a run folder that moves keeps its database."""
    spec = store.spec()
    if getattr(store, "recall", None):
        spec["recall"] = store.recall
    if is_lite(store.uri):
        spec["lite_relpath"] = os.path.relpath(store.uri, os.path.abspath(index_dir))
    return spec


def open_for(manifest: Mapping, index_dir: str, embeddings, labels, ids, paths) -> MilvusStore:
    """Opens the collection a loaded index names and repairs missed changes from its arrays."""
    spec = manifest.get("milvus")
    if not isinstance(spec, dict) or not spec.get("collection") or not spec.get("token"):
        raise CheckpointError(f"index {index_dir}: the manifest's milvus section is missing or "
                              f"incomplete; {_FIX}")
    uri = spec.get("uri")
    rel = spec.get("lite_relpath")
    if isinstance(rel, str) and is_lite(str(uri)) and not os.path.exists(str(uri)):
        uri = os.path.normpath(os.path.join(os.path.abspath(index_dir), rel))
    store = MilvusStore.open(spec, (manifest.get("embedder") or {}).get("params_hash") or "", uri)
    store.recall = spec.get("recall")
    changed = store.sync(ids, embeddings, labels, paths)
    if changed:
        print(f"note: Milvus collection {store.collection} differed from index {index_dir} by "
              f"{changed} items (a process stopped between a change and its save); repaired",
              flush=True)
    return store
