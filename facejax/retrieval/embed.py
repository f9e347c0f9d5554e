"""Export the embedding function with jax.export, and load and run it with jax alone.

Artifact layout (`workdir/embedder/`):
- `embedder.bin`: `jax.export` serialization of `f(param_leaves, images_u8[b,S,S,3]) -> f32[b,D]`
  with a symbolic batch `b`, lowered for cpu, cuda and tpu when possible.
- `params.bin`: the parameter leaves as raw bytes (tree-flatten order, 64-byte aligned).
- `embedder.json`: preprocessing and identity: cache_size (`input_size` in artifacts exported
  before the rename; read as cache_size), resize_mode, normalization, model,
  embed_dim, l2_normalized, metric, params_hash, the leaf table, facejax version, creation time,
  `files` (size and sha256 of embedder.bin; params.bin is covered by params_hash, a sha256 of
  its leaves) and `manifest_sha256` (of embedder.json itself). Every load checks them before
  parsing; artifacts exported before they existed load with a note.

Parameters are passed as arguments rather than baked into the module as constants: a VGG16 would
otherwise put 0.5 GB of constants through MLIR and XLA constant folding on every load. The leaves
are stored as a flat list, so loading needs no model code and no pytree registrations.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import facejax
from facejax.atomic import atomic_dir, atomic_path, write_file_atomic
from facejax.errors import CheckpointError, DataError
from facejax.retrieval import integrity
from facejax.rundir import migrate_embedder_meta, read_json
from facejax.sharding import data_sharded, make_data_mesh, replicated

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_BIN, _JSON, _PARAMS = "embedder.bin", "embedder.json", "params.bin"
_ALIGN = 64
# Lowered for all of these when possible, so an artifact exported on a GPU box runs on a laptop.
_PLATFORMS = ("cpu", "cuda", "tpu")
_REQUIRED_META = ("model", "cache_size", "resize_mode", "normalization")
_FIX = "export it again (scripts/export.py --workdir WORKDIR)"


def params_hash(leaves: Sequence[np.ndarray]) -> str:
    """sha256 over every leaf's dtype, shape and bytes, in tree-flatten order."""
    h = hashlib.sha256()
    for leaf in leaves:
        a = np.ascontiguousarray(leaf)
        h.update(f"{a.dtype.name}{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def export_embedder(fn: Callable[[Any, jax.Array], jax.Array], params: Any,
                    meta: Mapping[str, Any], out_dir: str) -> dict:
    """Exports `fn(params, images_u8[B,S,S,3]) -> f32[B,D]` to `out_dir` and returns its meta.

    `fn` must include resizing and normalisation, so the artifact takes the uint8 cache images.
    `meta` needs model, cache_size (S; input_size, its old name, is read as it), resize_mode
    and normalization; l2_normalized is
    measured on two random images when not given. Other keys are kept as they are.
    `out_dir` is replaced atomically.
    """
    meta = migrate_embedder_meta(meta)
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"export_embedder meta lacks {missing}")
    size = int(meta["cache_size"])
    leaves, treedef = jax.tree_util.tree_flatten(params)
    host_leaves = [np.asarray(jax.device_get(x)) for x in leaves]
    for i, leaf in enumerate(host_leaves):
        if leaf.dtype == object:
            raise ValueError(f"parameter leaf {i} is not an array: {type(leaves[i]).__name__}")

    def flat_fn(flat, images):
        return fn(jax.tree_util.tree_unflatten(treedef, flat), images)

    (b,) = jax.export.symbolic_shape("b")
    x_spec = jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8)
    p_spec = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in host_leaves]
    out = jax.eval_shape(flat_fn, p_spec, jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8))
    if len(out.shape) != 2 or out.shape[0] != 2:
        raise ValueError(f"the embedding function must return [B, D]; got shape {out.shape}")
    exported = _export(flat_fn, p_spec, x_spec)

    full = dict(meta)
    if "l2_normalized" not in full:
        probe = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        norms = np.linalg.norm(np.asarray(jax.jit(flat_fn)(host_leaves, probe)), axis=1)
        full["l2_normalized"] = bool(np.allclose(norms, 1.0, atol=1e-3))
    table, offset = [], 0
    for a in host_leaves:
        offset = -(-offset // _ALIGN) * _ALIGN
        table.append(dict(dtype=a.dtype.name, shape=list(a.shape), offset=offset))
        offset += a.nbytes
    full.update(
        format_version=FORMAT_VERSION,
        cache_size=size,
        embed_dim=int(out.shape[1]),
        output_dtype=np.dtype(out.dtype).name,
        metric=full.get("metric", "dot"),
        params_hash=params_hash(host_leaves),
        num_params=int(sum(a.size for a in host_leaves)),
        platforms=list(exported.platforms),
        facejax_version=facejax.__version__,
        jax_version=jax.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        param_leaves=table,
    )
    with atomic_dir(out_dir) as tmp:
        with open(os.path.join(tmp, _BIN), "wb") as f:
            f.write(exported.serialize())
        with open(os.path.join(tmp, _PARAMS), "wb") as f:
            for a, entry in zip(host_leaves, table):
                f.seek(entry["offset"])
                f.write(np.ascontiguousarray(a).tobytes())
        full["files"] = integrity.hash_files(tmp, [_BIN])
        with open(os.path.join(tmp, _JSON), "w") as f:
            json.dump(integrity.seal(full), f, indent=2)
    return full


def _export(flat_fn, p_spec, x_spec) -> jax.export.Exported:
    try:
        return jax.export.export(jax.jit(flat_fn), platforms=_PLATFORMS)(p_spec, x_spec)
    except Exception as e:  # noqa: BLE001  (any primitive may lack another platform's lowering)
        log.warning("exporting for %s failed (%s); exporting for %s only",
                    _PLATFORMS, e, jax.export.default_export_platform())
        return jax.export.export(jax.jit(flat_fn))(p_spec, x_spec)


class Embedder:
    """A loaded embedding artifact: `embedder(images_u8[B,S,S,3]) -> np.float32[B,D]`."""

    # Calls of at most this many images run on one device even when the process has several
    # (the CPU preset's host devices): split over two, a single query is padded to two images
    # and took longer than on one device (BENCHMARKS.md, "Batch sizes, a single query, ...").
    small_batch = 1

    def __init__(self, exported: jax.export.Exported, leaves: list[np.ndarray], meta: dict):
        self.meta = meta
        self.cache_size = int(meta["cache_size"])
        self.embed_dim = int(meta["embed_dim"])
        # This process's devices: in a multi-process job each process embeds its own items.
        devices = jax.local_devices()
        self.num_devices = len(devices)
        if self.num_devices > 1:
            # Data parallel: the 1-device artifact is partitioned over a 1-D 'data' mesh.
            mesh = make_data_mesh(devices)
            rep, shard = replicated(mesh), data_sharded(mesh)
            self._leaves = jax.device_put(leaves, rep)
            # Placed before the call: in a multi-process job jit refuses numpy inputs with a
            # sharding, even over this process's own devices.
            self._put = lambda batch: jax.device_put(batch, shard)
            self._fn = jax.jit(exported.call, in_shardings=(rep, shard), out_shardings=shard)
            # Small calls (a single query) run whole on the first device, on its copy of the
            # replicated parameters: split over the devices they are slower (`small_batch`).
            self._leaves_one = [leaf.addressable_data(0) for leaf in self._leaves]
            self._fn_one = jax.jit(exported.call)
        else:
            self._leaves = jax.device_put(leaves)
            self._put = lambda batch: batch
            self._fn = jax.jit(exported.call)

    def _check(self, images) -> None:
        s = self.cache_size
        if len(images.shape) != 4 or tuple(images.shape[1:]) != (s, s, 3):
            raise DataError(f"the embedder takes uint8 images [B,{s},{s},3]; got shape "
                            f"{tuple(images.shape)}")
        if images.dtype != np.uint8:
            raise DataError(f"the embedder takes uint8 images; got {images.dtype}")

    def __call__(self, images_u8: np.ndarray) -> np.ndarray:
        images_u8 = np.asarray(images_u8)
        self._check(images_u8)
        n = images_u8.shape[0]
        if self.num_devices > 1 and n <= self.small_batch:
            out = self._fn_one(self._leaves_one, _pad_to(images_u8, max(n, 1)))
            return np.asarray(out, dtype=np.float32)[:n]
        padded = _pad_to(images_u8, -(-max(n, 1) // self.num_devices) * self.num_devices)
        return np.asarray(self._fn(self._leaves, self._put(padded)), dtype=np.float32)[:n]

    def embed_array(self, images, batch_size: int = 256, progress: bool = True,
                    indices: np.ndarray | None = None, threads: int | None = None
                    ) -> np.ndarray:
        """Embeds `images[indices]` (all when None) in fixed-size batches -> f32[N, D].

        Every batch, the last one padded, has the same shape, so it compiles once. `images`
        may be a memmap; at most `threads` batches of it are in memory at a time. `threads`
        batches run at once (default: 2 on a CPU, 1 on an accelerator): one XLA:CPU execution
        of a CNN keeps only ~1.2 of 2 cores busy (BUILD_NOTES.md).
        """
        from concurrent.futures import ThreadPoolExecutor

        self._check(images)
        n = len(images) if indices is None else len(indices)
        batch_size = -(-max(1, batch_size) // self.num_devices) * self.num_devices
        if threads is None:
            threads = 2 if jax.default_backend() == "cpu" else 1
        out = np.empty((n, self.embed_dim), np.float32)
        try:
            from tqdm import tqdm
            bar = tqdm(total=n, desc="embed", unit="img", disable=not progress, leave=False)
        except ImportError:  # tqdm is a dependency; the bar is cosmetic all the same
            bar = None

        def run(start: int) -> int:
            stop = min(start + batch_size, n)
            sel = slice(start, stop) if indices is None else np.asarray(indices[start:stop])
            batch = np.asarray(images[sel])
            res = self._fn(self._leaves, self._put(_pad_to(batch, batch_size)))
            out[start:stop] = np.asarray(res, dtype=np.float32)[: stop - start]
            return stop - start

        starts = list(range(0, n, batch_size))
        with ThreadPoolExecutor(max(1, threads)) as pool:
            # Submitted a window at a time, so memory holds `threads` batches, not all of them.
            pending = [pool.submit(run, s) for s in starts[:threads]]
            for s in starts[threads:] + [None] * len(pending):
                done = pending.pop(0).result()
                if bar is not None:
                    bar.update(done)
                if s is not None:
                    pending.append(pool.submit(run, s))
        if bar is not None:
            bar.close()
        return out


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[0] == n:
        return x
    pad = np.zeros((n - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])


def load_embedder(path: str, verify: bool = True) -> Embedder:
    """Loads an artifact directory written by `export_embedder`; needs jax only.

    Raises CheckpointError for a missing, unreadable or corrupt artifact. With `verify`,
    embedder.bin is checked against its sha256 in embedder.json and the parameter bytes are
    re-hashed against `params_hash`. An artifact exported before embedder.bin had a hash loads
    with a note, after its module has been parsed and lowered once (that catches most damage,
    which would otherwise surface only at the first call).
    """
    meta = read_embedder_meta(path)
    hashed = "files" in meta
    if hashed and verify:
        integrity.verify_files(path, meta["files"], what=f"embedder {path}", fix=_FIX)
    elif not hashed:
        print(f"note: embedder {path} has no hash of {_BIN} (exported by an older facejax), "
              f"so damage shows only when it fails to load; {_FIX} to add it", flush=True)
    try:
        with open(os.path.join(path, _BIN), "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
    except FileNotFoundError:
        raise CheckpointError(f"embedder artifact {path} has no {_BIN}; {_FIX}") from None
    except Exception as e:  # flatbuffer/MLIR parse errors have no common type
        raise CheckpointError(f"embedder {os.path.join(path, _BIN)} is corrupt or from an "
                              f"incompatible jax ({type(e).__name__}: {e}); {_FIX}") from None
    leaves = _read_params(os.path.join(path, _PARAMS), meta)
    if verify and params_hash(leaves) != meta["params_hash"]:
        raise CheckpointError(f"embedder parameters in {path}/{_PARAMS} do not match "
                              f"params_hash in {_JSON}: the artifact is corrupt; export it again")
    if len(exported.in_avals) != len(leaves) + 1:
        raise CheckpointError(f"embedder {path}: {_BIN} takes {len(exported.in_avals) - 1} "
                              f"parameter arrays but {_JSON} lists {len(leaves)}")
    platform = jax.export.default_export_platform()  # 'cuda', not jax's generic 'gpu'
    if platform not in exported.platforms:
        raise CheckpointError(f"embedder {path} was exported for {list(exported.platforms)} and "
                              f"cannot run on {platform}; export it again on this machine")
    if not hashed:
        _check_module(exported, leaves, int(meta["cache_size"]), path)
    return Embedder(exported, leaves, meta)


def _check_module(exported, leaves: list[np.ndarray], size: int, path: str) -> None:
    """Parses and lowers the module once: without a hash this is where a damaged embedder.bin
    shows (parse errors, impossible device counts, shapes that no longer verify)."""
    try:
        exported.mlir_module()
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
        jax.jit(exported.call).lower(specs, jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
    except Exception as e:  # noqa: BLE001  (MLIR and jax raise many types for a bad module)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"embedder {os.path.join(path, _BIN)} is damaged: it does not "
                              f"load ({type(e).__name__}: {first[:200]}); {_FIX}") from None


def read_embedder_meta(path: str) -> dict:
    """Reads and checks `embedder.json` without loading the function."""
    meta_path = os.path.join(path, _JSON)
    if not os.path.isdir(path):
        raise CheckpointError(f"no exported embedder at {path}; export one first "
                              f"(run scripts/export.py --workdir WORKDIR after training)")
    meta = read_json(meta_path, f"embedder artifact {path} has no {_JSON}", _FIX)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is not a JSON object; {_FIX}")
    integrity.check_seal(meta, meta_path, _FIX)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path} has format_version {version!r}; this facejax "
                              f"reads {FORMAT_VERSION}")
    meta = migrate_embedder_meta(meta)  # after the seal, which covers the file as written
    needed = _REQUIRED_META + ("embed_dim", "params_hash", "param_leaves", "l2_normalized")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} lacks {missing}")
    return meta


def _read_params(path: str, meta: dict) -> list[np.ndarray]:
    try:
        size = os.path.getsize(path)
        raw = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except FileNotFoundError:
        raise CheckpointError(f"embedder parameters {path} are missing; {_FIX}") from None
    leaves = []
    for i, entry in enumerate(meta["param_leaves"]):
        try:
            dtype = np.dtype(jnp.dtype(entry["dtype"]))
            shape = tuple(int(s) for s in entry["shape"])
            start = int(entry["offset"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"bad parameter entry {i} in embedder.json: {e}") from e
        stop = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if stop > size:
            raise CheckpointError(f"{path} is truncated ({size} bytes; leaf {i} needs {stop}); "
                                  f"{_FIX}")
        leaves.append(np.array(raw[start:stop]).view(dtype).reshape(shape))
    return leaves


def embedding_work_key(meta: Mapping[str, Any], paths: Sequence[str], shard_size: int) -> str:
    """Identifies one embedding job: the embedder, the exact item list and the shard size."""
    h = hashlib.sha256(f"{meta['params_hash']}|{shard_size}|".encode())
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def embed_to_shards(embedder: Embedder, images, indices: np.ndarray, paths: Sequence[str],
                    work_dir: str, *, shard_size: int = 16384, batch_size: int = 256,
                    progress: bool = True, select: Callable[[int], bool] | None = None
                    ) -> np.ndarray | None:
    """Embeds `images[indices]` shard by shard under `work_dir`, skipping finished shards.

    A rerun after an interruption resumes at the first missing shard. `work.json` records a
    key over the embedder hash and the item paths; a different job wipes stale shards.
    `select(shard_number)`: only those shards are embedded (one process's part of a
    multi-process job, facejax.retrieval.multihost); nothing is loaded and None is returned.
    """
    indices = np.asarray(indices, np.int64)
    key = embedding_work_key(embedder.meta, paths, shard_size)
    os.makedirs(work_dir, exist_ok=True)
    key_path = os.path.join(work_dir, "work.json")
    try:
        with open(key_path) as f:
            old = json.load(f).get("key")
    except (OSError, ValueError, AttributeError):
        old = None
    if old != key:
        for name in os.listdir(work_dir):
            if name.startswith("shard_") and name.endswith(".npy"):
                os.remove(os.path.join(work_dir, name))
        write_file_atomic(key_path, json.dumps(dict(key=key, count=len(indices),
                                                    shard_size=shard_size)).encode())
    n_shards = -(-len(indices) // shard_size)
    parts = []
    for s in range(n_shards):
        if select is not None and not select(s):
            continue
        shard_path = os.path.join(work_dir, f"shard_{s:05d}.npy")
        want = min(shard_size, len(indices) - s * shard_size)
        emb = None
        if os.path.exists(shard_path):
            try:
                emb = np.load(shard_path)
            except (OSError, ValueError):
                emb = None  # a torn write from a crash: redo this shard
            if emb is not None and emb.shape != (want, embedder.embed_dim):
                emb = None
        if emb is None:
            if progress:
                print(f"embedding shard {s + 1}/{n_shards} ({want} images)", flush=True)
            sel = indices[s * shard_size: s * shard_size + want]
            emb = embedder.embed_array(images, batch_size=batch_size, progress=progress,
                                       indices=sel)
            with atomic_path(shard_path, ".npy") as tmp:
                np.save(tmp, emb)
        if select is None:
            parts.append(emb)
    if select is not None:
        return None
    if not parts:
        return np.zeros((0, embedder.embed_dim), np.float32)
    return np.concatenate(parts)
