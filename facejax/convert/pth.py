"""Torch-free `.pth` reader: a restricted unpickler that only rebuilds tensors as numpy arrays."""

# A pickle can call any importable function while it loads, so `find_class` allows only what a
# state dict needs (tensor/parameter rebuilders, storage types, OrderedDict, torch.Size, ...) and
# raises WeightsError naming any other global; nothing from the file is ever executed.
#
# Sizes are checked before anything is allocated (`facejax.convert.limits`): each pickle's opcodes
# are counted and its memo indices bounded before it is unpickled, zip records' declared sizes are
# checked against their compressed sizes, every tensor view must lie inside its storage and may
# not repeat it (stride 0) into more than SMALL_BYTES, all tensors together may hold at most
# VIEW_FACTOR times their storages' bytes, and containers may nest MAX_NESTING deep.

from __future__ import annotations

import collections
import io
import logging
import math
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from facejax.convert.limits import SMALL_BYTES, ByteBudget, size_text
from facejax.errors import WeightsError

log = logging.getLogger(__name__)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"

# torch's pickled storage classes -> little-endian numpy dtype. bfloat16 has no numpy dtype, so
# it is read as its raw uint16 bits and widened to float32 (exactly) afterwards.
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "BFloat16Storage": "<u2", "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
    "ComplexDoubleStorage": "<c16", "ComplexFloatStorage": "<c8", "UntypedStorage": "u1",
}
# Wrapper keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params")
# Opcodes per pickle (each builds at most one object, ~60-80 bytes for the smallest containers):
# a ResNet152 checkpoint with its Adam state is 76k; 2M bounds what a pickle builds to ~160 MB.
MAX_PICKLE_OPS = 2_000_000
# Containers inside containers: a checkpoint with optimizer state is 5 deep.
MAX_NESTING = 100
# All tensors together may hold this many times the bytes of their storages (views that share
# data, e.g. tied weights), plus SMALL_BYTES.
VIEW_FACTOR = 2
MAX_NDIM = 32
_MAX_INDEX = 1 << 48       # any size, stride or offset (in elements) beyond this is corrupt
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


class _Frozen:
    """Objects handed to the unpickler: pickle's BUILD opcode would otherwise set attributes on
    them (and these are shared by every later load), so any change is refused."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise WeightsError(f"refusing to modify {self!r} while unpickling")

    def __setstate__(self, state):
        raise WeightsError(f"refusing to modify {self!r} while unpickling")


class _Allowed(_Frozen):
    """An allowlisted function, as find_class returns it."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self):
        return self.fn.__name__


class _Marker(_Frozen):
    """A harmless stand-in for an allowed torch class; calling it is refused."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        object.__setattr__(self, "qualname", qualname)

    def __call__(self, *args, **kwargs):
        raise WeightsError(f"refusing to call {self.qualname} while unpickling")

    def __repr__(self):
        return self.qualname


class _StorageType(_Marker):
    __slots__ = ("dtype", "name")

    def __init__(self, name: str):
        super().__init__(f"torch.{name}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(_STORAGE_DTYPES[name]))


class _StorageRef:
    """A storage named by the pickle; its bytes are read after unpickling (legacy stores them
    after the pickle). `offset`/`numel` restrict a legacy storage view, in elements."""

    __slots__ = ("key", "numel", "offset", "stype")

    def __init__(self, key: str, stype: _StorageType, offset: int = 0, numel: int | None = None):
        self.key, self.stype, self.offset, self.numel = key, stype, offset, numel


class _LazyTensor:
    __slots__ = ("offset", "size", "storage", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise WeightsError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
        self.storage = storage
        self.offset = _ints(offset, "storage offset")
        self.size = tuple(_ints(size, "size"))
        self.stride = tuple(_ints(stride, "stride"))
        if len(self.size) != len(self.stride):
            raise WeightsError(f"tensor size {self.size} and stride {self.stride} differ in rank")


def _ints(v, what):
    try:
        return int(v) if not isinstance(v, (tuple, list)) else [int(x) for x in v]
    except (TypeError, ValueError):
        raise WeightsError(f"tensor {what} is not integer: {v!r}") from None


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if metadata:  # conj/neg bits only exist for complex views; a state dict never has them
        raise WeightsError(f"unsupported tensor metadata {metadata!r}")
    return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch uses this for Tensor/Parameter with Python attributes; `func` passed find_class.
    if not (isinstance(func, _Allowed)
            and func.fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter)):
        raise WeightsError(f"refusing tensor rebuild via {func!r}")
    return func(*args)


def _encode(text, encoding="latin1"):
    # protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
    if encoding != "latin1" or not isinstance(text, str):
        raise WeightsError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


# Builtin types are immutable, so they are handed out as they are.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _Allowed(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _Allowed(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _Allowed(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _Allowed(_rebuild_parameter),
    ("torch._tensor", "_rebuild_from_type_v2"): _Allowed(_rebuild_from_type_v2),
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.parameter.Parameter"),
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _Allowed(_encode),
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
    **{("torch.storage", name): _StorageType(name) for name in ("UntypedStorage",)},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str, refs: dict[str, _StorageRef]):
        super().__init__(file)
        self._path, self._refs = path, refs

    def find_class(self, module, name):
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise WeightsError(
                f"{self._path}: refusing to load the global {module}.{name}: a weights file only "
                "needs tensors, and unpickling an arbitrary global could run code. If you trust "
                "this file, re-save it as a plain state_dict of tensors")
        return fn

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise WeightsError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise WeightsError(f"{self._path} holds a pickled nn.Module, not a state_dict; "
                               "re-save it with torch.save(model.state_dict(), path)")
        if kind != "storage" or len(pid) not in (5, 6):
            raise WeightsError(f"unexpected persistent id {pid!r}")
        stype, key = pid[1], str(pid[2])
        if not isinstance(stype, _StorageType):
            raise WeightsError(f"storage {key} has type {stype!r}, not a torch storage type")
        known = self._refs.setdefault(key, _StorageRef(key, stype))
        if known.stype.dtype != stype.dtype:
            raise WeightsError(f"storage {key} is used with two dtypes")
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return known
        _view_key, offset, numel = view  # legacy storage views: (key, offset, numel) in elements
        return _StorageRef(key, stype, int(offset), int(numel))


def _check_pickle(file, path: str) -> None:
    """Walks one pickle's opcodes without building anything, then rewinds: refuses more than
    MAX_PICKLE_OPS opcodes and memo indices beyond the opcode count (the C unpickler sizes its
    memo table by the largest index: one 10-byte opcode can make it allocate gigabytes)."""
    start = file.tell()
    for count, (op, arg, _) in enumerate(pickletools.genops(file), 1):
        if count > MAX_PICKLE_OPS:
            raise WeightsError(f"{path}: a pickle of more than {MAX_PICKLE_OPS:,} opcodes (a state "
                               "dict of the largest model has under 100,000): not a weights file")
        if op.name in _MEMO_PUTS and arg >= count:
            raise WeightsError(f"{path}: pickle memo index {arg:,} at opcode {count:,}: a "
                               "corrupt or hostile file")
    file.seek(start)


def _unpickle(data_or_file, path, refs):
    file = io.BytesIO(data_or_file) if isinstance(data_or_file, bytes) else data_or_file
    try:
        _check_pickle(file, path)
        return _Unpickler(file, path, refs).load()
    except WeightsError:
        raise
    except Exception as e:  # a corrupt/foreign file can fail in any way inside pickle
        raise WeightsError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") \
            from e


def _read_zip(path: str) -> tuple[Any, dict[str, np.ndarray], dict[str, _StorageRef]]:
    """torch >= 1.6: `<prefix>/data.pkl` plus one raw record `<prefix>/data/<key>` per storage,
    little-endian unless `<prefix>/byteorder` says 'big'."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise WeightsError(f"{path}: corrupt zip-format .pth ({e})") from e
    budget = ByteBudget(path)

    def read(name: str) -> bytes:
        info = zf.getinfo(name)
        budget.add(f"zip record {name}", info.file_size, info.compress_size)
        return zf.read(name)

    with zf:
        names = set(zf.namelist())
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise WeightsError(f"{path}: a zip file but not a PyTorch checkpoint (no "
                               "<name>/data.pkl record)")
        prefix = pkls[0][: -len("data.pkl")]
        order = "<"
        refs: dict[str, _StorageRef] = {}
        try:
            if prefix + "byteorder" in names:
                mark = read(prefix + "byteorder")
                if mark not in (b"little", b"big"):
                    raise WeightsError(f"{path}: unknown byteorder {mark!r}")
                order = "<" if mark == b"little" else ">"
            obj = _unpickle(read(pkls[0]), path, refs)
            buffers = {}
            for key, ref in refs.items():
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise WeightsError(f"{path}: storage record {record} is missing")
                buffers[key] = np.frombuffer(read(record), ref.stype.dtype.newbyteorder(order)
                                             if ref.stype.dtype.itemsize > 1 else ref.stype.dtype)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise WeightsError(f"{path}: corrupt zip-format .pth ({e})") from e
    return obj, buffers, refs


def _read_legacy(path: str) -> tuple[Any, dict[str, np.ndarray], dict[str, _StorageRef]]:
    """torch < 1.6 (or `_use_new_zipfile_serialization=False`): pickles of the magic number, the
    protocol version and sys_info, then the main pickle, then the list of storage keys, then per
    storage an int64 little-endian element count and its little-endian raw bytes."""
    refs: dict[str, _StorageRef] = {}
    budget = ByteBudget(path)
    with open(path, "rb") as f:
        header = f.read(262)
        if len(header) > 261 and header[257:262] == b"ustar":
            raise WeightsError(f"{path}: tar-format checkpoint from torch < 0.4 is not supported; "
                               "re-save it with a newer torch")
        f.seek(0)
        # The C unpickler stops exactly at each pickle's STOP opcode on a buffered file (torch
        # relies on this too), so the raw storages start at f.tell() after the key list.
        magic = _unpickle(f, path, refs)
        if magic != _LEGACY_MAGIC:
            raise WeightsError(f"{path}: not a PyTorch .pth file (bad magic number)")
        protocol = _unpickle(f, path, refs)
        if protocol != _LEGACY_PROTOCOL:
            raise WeightsError(f"{path}: unsupported legacy protocol version {protocol!r}")
        _unpickle(f, path, refs)  # sys_info: endianness/type sizes of the saver
        obj = _unpickle(f, path, refs)
        keys = _unpickle(f, path, refs)
        if not isinstance(keys, list) or set(map(str, keys)) != set(refs):
            raise WeightsError(f"{path}: storage key list does not match the tensors")
        buffers = {}
        for key in keys:
            key = str(key)
            dtype = refs[key].stype.dtype
            count = f.read(8)
            if len(count) < 8:
                raise WeightsError(f"{path}: truncated (storage {key} missing)")
            n = int.from_bytes(count, "little", signed=True)
            if n < 0 or n * dtype.itemsize > os.path.getsize(path):
                raise WeightsError(f"{path}: corrupt storage {key} size {n}")
            budget.add(f"storage {key}", n * dtype.itemsize, n * dtype.itemsize)
            raw = f.read(n * dtype.itemsize)
            if len(raw) < n * dtype.itemsize:
                raise WeightsError(f"{path}: truncated (storage {key} is short)")
            buffers[key] = np.frombuffer(raw, dtype)
    return obj, buffers, refs


_SCALARS = (str, bytes, int, float, complex, bool, type(None))


def _where(trail: tuple) -> str:
    return "".join(f"[{r[:40] + '...' if len(r := repr(k)) > 43 else r}]" for k in trail) or "top"


class _Builder:
    """Replaces each tensor of an unpickled object by a numpy array, checking every view against
    its storage and the running total against the storages' bytes before allocating it.

    An object the pickle references twice is built once (as torch.load shares it); a container
    that holds itself, or containers nested more than MAX_NESTING deep, are refused.
    """

    def __init__(self, buffers: dict[str, np.ndarray], path: str):
        self.buffers, self.path = buffers, path
        self.stored = sum(b.nbytes for b in buffers.values())
        self.allowed = VIEW_FACTOR * self.stored + SMALL_BYTES
        self.spent = self.bf16 = 0
        self.done: dict[int, Any] = {}
        self.active: set[int] = set()

    def build(self, obj, trail: tuple = (), depth: int = 0):
        if isinstance(obj, _SCALARS):
            return obj
        if depth > MAX_NESTING:
            raise WeightsError(f"{self.path}: containers nested more than {MAX_NESTING} deep at "
                               f"{_where(trail[:5])}...: not a state dict")
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            raise WeightsError(f"{self.path}: a container holds itself at {_where(trail)}: not "
                               "a state dict")
        self.active.add(key)
        try:
            out = self._build(obj, trail, depth + 1)
        finally:
            self.active.discard(key)
        self.done[key] = out
        return out

    def _build(self, obj, trail, depth):
        if isinstance(obj, _LazyTensor):
            return self.array(obj, trail)
        if isinstance(obj, dict):
            items = [(self.hashable(k, trail, depth), self.build(v, trail + (k,), depth))
                     for k, v in obj.items()]
            return collections.OrderedDict(items) if isinstance(obj, collections.OrderedDict) \
                else dict(items)
        if isinstance(obj, (list, tuple)):
            return type(obj)(self.build(v, trail + (i,), depth) for i, v in enumerate(obj))
        if isinstance(obj, (set, frozenset)):
            return type(obj)(self.hashable(v, trail, depth) for v in obj)
        if isinstance(obj, (_StorageRef, _Marker)):
            raise WeightsError(f"{self.path}: holds a bare {obj!r} at {_where(trail)}, not tensors")
        return obj

    def hashable(self, obj, trail, depth):
        out = self.build(obj, trail, depth)
        if isinstance(out, np.ndarray):
            raise WeightsError(f"{self.path}: a tensor used as a dict key or set member at "
                               f"{_where(trail)}: not a state dict")
        return out

    def array(self, t: _LazyTensor, trail: tuple) -> np.ndarray:
        ref, path = t.storage, self.path
        buf = self.buffers[ref.key]
        start = ref.offset + t.offset
        what = f"tensor {_where(trail)} of size {t.size}, stride {t.stride}, offset {start}"
        if (len(t.size) > MAX_NDIM or start < 0 or ref.offset < 0
                or any(not 0 <= v < _MAX_INDEX for v in (*t.size, *t.stride, start))):
            raise WeightsError(f"{path}: {what}: a size, stride or offset is negative or out "
                               "of range")
        limit = len(buf) if ref.numel is None else max(0, min(len(buf), ref.offset + ref.numel))
        numel = math.prod(t.size)
        bf16 = ref.stype.name == "BFloat16Storage"
        nbytes = numel * (4 if bf16 else buf.dtype.itemsize)
        if numel:
            last = start + sum((n - 1) * s for n, s in zip(t.size, t.stride))
            if last >= limit:  # as_strided does no bounds checks: refuse before reading
                raise WeightsError(f"{path}: {what} reads past its storage ({limit} elements)")
            if numel > limit - start and nbytes > SMALL_BYTES:
                raise WeightsError(
                    f"{path}: {what} repeats its storage's {limit - start} elements into "
                    f"{numel:,} ({size_text(nbytes)}): a real weight holds its own data; "
                    f"refusing to expand a view beyond {size_text(SMALL_BYTES)}")
        if self.spent + nbytes > self.allowed:
            raise WeightsError(
                f"{path}: its tensors hold more than {size_text(self.allowed)} (at {what}) from "
                f"{size_text(self.stored)} of storage: views that repeat the same data, not a "
                "state dict")
        self.spent += nbytes
        if numel == 0:
            arr = np.zeros(t.size, buf.dtype)
        else:
            item = buf.dtype.itemsize
            arr = np.lib.stride_tricks.as_strided(buf[start:], t.size,
                                                  [s * item for s in t.stride], writeable=False)
        out = np.array(arr, dtype=buf.dtype.newbyteorder("="), order="C")  # owned, contiguous
        if bf16:
            self.bf16 += 1
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out


def load_pth_object(path: str | os.PathLike) -> Any:
    """Unpickles a `.pth` with every tensor as a numpy array (containers kept as saved).

    bfloat16 tensors come back as float32 (exact widening); others keep their dtype.
    Raises WeightsError for a missing, corrupt, non-allowlisted or oversized file (sizes are
    checked against the file before anything they declare is allocated).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise WeightsError(f"{path}: empty file")
    obj, buffers, _ = (_read_zip if head == _ZIP_MAGIC else _read_legacy)(path)
    builder = _Builder(buffers, path)
    out = builder.build(obj)
    if builder.bf16:
        log.info("%s: widened %d bfloat16 tensors to float32", path, builder.bf16)
    return out


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


def load_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (`{'layer.weight': array, ...}`) without torch.

    Accepts a bare state dict or one nested under a usual wrapper key ('state_dict', 'model',
    ...). Raises WeightsError when the file holds something else.
    """
    obj = load_pth_object(path)
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return dict(obj[key])
        shown = ", ".join(map(repr, list(obj)[:10]))
        raise WeightsError(f"{path}: no state dict of tensors found (top-level keys: {shown})")
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
