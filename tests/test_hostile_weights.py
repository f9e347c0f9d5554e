"""Hostile weight files: tiny files that declare huge tensors, bombs, deep nesting.

Each file is written by hand here. Every reader must refuse it with a WeightsError that says
what is wrong, and without allocating what it declares: each case is loaded in a fresh Python
process whose peak RSS growth must stay far below the declared size (GROWTH_LIMIT vs >= 512 MiB).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from facejax.convert.pth import MAX_NESTING, MAX_PICKLE_OPS, load_pth, load_pth_object

ROOT = Path(__file__).resolve().parents[1]
GROWTH_LIMIT = 100 << 20   # peak RSS growth allowed per load; every case declares >= 512 MiB

# ---- loading in a fresh process, measuring peak memory --------------------------------------

_PROBE = r"""
import importlib, json, resource, sys
from facejax.errors import WeightsError
module, name = sys.argv[1].split(":")
load = getattr(importlib.import_module(module), name)
for extra in filter(None, sys.argv[2].split(",")):
    importlib.import_module(extra)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
for path in sys.argv[3:]:
    before = peak()
    try:
        load(path)
        outcome = "loaded"
    except WeightsError as e:
        outcome = f"WeightsError: {e}"
    print(json.dumps({"path": path, "outcome": outcome, "grew": peak() - before}), flush=True)
"""


def _probe(loader: str, cases: dict[str, tuple[Path, str]], preload: tuple[str, ...] = ()):
    """Loads each case's file with `loader` ('module:function') in one fresh process and checks
    its outcome against the case's regex and its peak RSS growth against GROWTH_LIMIT.

    Peak RSS only rises, so once one case allocates, later cases' growth reads low; the first
    case over the limit is the one reported.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "JAX_PLATFORMS": "cpu"}
    paths = [str(path) for path, _ in cases.values()]
    run = subprocess.run([sys.executable, "-c", _PROBE, loader, ",".join(preload), *paths],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, f"the loader crashed (a traceback, not a WeightsError):\n" \
                                f"{run.stdout}\n{run.stderr[-3000:]}"
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases)
    for (name, (_, want)), got in zip(cases.items(), results):
        assert got["grew"] < GROWTH_LIMIT, (
            f"{name}: peak memory grew by {got['grew'] >> 20} MiB ({got['outcome'][:200]})")
        assert re.search(want, got["outcome"]), f"{name}: {got['outcome'][:500]}"


# ---- hand-written torch pickles (protocol 2) -------------------------------------------------

def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(v: int) -> bytes:
    return b"\x8a\x08" + int(v).to_bytes(8, "little", signed=True)     # LONG1


def _tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"                             # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tensor(size, stride, offset=0, key="0", numel=1) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage `key`, offset, size, stride, False, {})."""
    pid = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str(key), _str("cpu"),
                  _int(numel)]) + b"Q"                               # BINPERSID
    args = _tuple([pid, _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)),
                   b"\x89", _global("collections", "OrderedDict") + b")R"])
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict(items: dict[str, bytes]) -> bytes:
    return b"\x80\x02}" + b"".join(_str(k) + v + b"s" for k, v in items.items()) + b"."


def _zip_pth(path: Path, pickle_bytes: bytes, records: dict[str, bytes] | None = None,
             zeros: int = 0) -> Path:
    """A zip-format .pth: archive/data.pkl plus stored raw records, and `zeros` bytes of zeros
    as a deflated record '0' (a zip bomb)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes, compress_type=zipfile.ZIP_STORED)
        for key, data in (records or {}).items():
            zf.writestr(f"archive/data/{key}", data, compress_type=zipfile.ZIP_STORED)
        if zeros:
            with zf.open("archive/data/0", "w", force_zip64=True) as f:
                chunk = bytes(16 << 20)
                for _ in range(zeros // len(chunk)):
                    f.write(chunk)
    return path


MIB = 1 << 20


@pytest.mark.slow
def test_pth_hostile_files_are_refused_in_bounded_memory(tmp_path):
    one_mib = np.zeros(MIB // 4, "<f4").tobytes()
    full_view = _tensor((MIB // 4,), (1,), numel=MIB // 4)
    # Lists pushed 5,000 deep then appended into each other; a list appended to itself.
    nested = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."
    itself = b"\x80\x02]q\x00h\x00a."                    # l = []; l.append(l)
    cases = {
        # 1.6 KB: a 1-element storage viewed as 20000x20000 through stride 0 (1.5 GiB).
        "stride 0": (_zip_pth(tmp_path / "stride0.pth", _state_dict(
            {"w": _tensor((20000, 20000), (0, 0))}), {"0": bytes(4)}),
            r"WeightsError: .*\['w'\].*repeats its storage's 1 elements into 400,000,000"),
        # 2.2 MB: a deflated record of 512 MiB of zeros.
        "zip bomb": (_zip_pth(tmp_path / "bomb.pth", _state_dict(
            {"w": _tensor((128 * MIB,), (1,), numel=128 * MIB)}), zeros=512 * MIB),
            r"WeightsError: .*zip record archive/data/0 declares 512.0 MiB from .* compression "
            r"bomb"),
        # 2,000 distinct full views of one 1 MiB storage: 2 GiB from 1 MiB.
        "many views": (_zip_pth(tmp_path / "views.pth", _state_dict(
            {f"w{i}": full_view for i in range(2000)}), {"0": one_mib}),
            r"WeightsError: .*tensors hold more than 18.0 MiB .* from 1.0 MiB of storage"),
        # 10 bytes: a memo index that makes the C unpickler allocate a 1 GiB table.
        "memo index": (_zip_pth(tmp_path / "memo.pth", b"\x80\x02]r" + struct.pack(
            "<I", 1 << 26) + b"."), r"WeightsError: .*memo index 67,108,864"),
        # 4 MiB of empty lists: 320 MB of Python objects.
        "opcodes": (_zip_pth(tmp_path / "ops.pth", b"\x80\x02(" + b"]" * (4 * MIB) + b"l."),
                    rf"WeightsError: .*more than {MAX_PICKLE_OPS:,} opcodes"),
        "nesting": (_zip_pth(tmp_path / "nested.pth", nested),
                    rf"WeightsError: .*nested more than {MAX_NESTING} deep at \[0\]\[0\]"),
        "holds itself": (_zip_pth(tmp_path / "itself.pth", itself),
                         r"WeightsError: .*a container holds itself"),
        # The same tensor object referenced 2,000 times is one array (as torch.load shares it).
        "shared": (_zip_pth(tmp_path / "shared.pth", b"\x80\x02" + full_view + b"q\x000("
                            + b"h\x00" * 2000 + b"l.", {"0": one_mib}), r"^loaded$"),
    }
    assert (tmp_path / "stride0.pth").stat().st_size < 2000
    assert (tmp_path / "bomb.pth").stat().st_size < 4 * MIB
    _probe("facejax.convert.pth:load_pth_object", cases)


def test_pth_shared_references_stay_shared_and_normal_views_load(tmp_path):
    data = np.arange(12, dtype="<f4")
    path = _zip_pth(tmp_path / "ok.pth", b"\x80\x02" + _tensor((3, 4), (4, 1), numel=12)
                    + b"q\x000(h\x00h\x00" + _tensor((4, 3), (1, 4), numel=12) + b"l.",
                    {"0": data.tobytes()})
    a, b, t = load_pth_object(path)
    assert a is b and t is not a
    np.testing.assert_array_equal(a, data.reshape(3, 4))
    np.testing.assert_array_equal(t, data.reshape(3, 4).T)
    # A small stride-0 expansion (within SMALL_BYTES) is a legitimate torch view.
    small = _zip_pth(tmp_path / "expand.pth", _state_dict(
        {"w": _tensor((3, 4), (1, 0), numel=3)}), {"0": data[:3].tobytes()})
    np.testing.assert_array_equal(load_pth(small)["w"], np.repeat(data[:3, None], 4, axis=1))


# ---- HDF5 (Keras) ----------------------------------------------------------------------------

def _keras2_h5(path: Path, make, weights: int = 1) -> Path:
    """A Keras 2 weights file with one layer, conv1_conv, whose weights `make` creates."""
    import h5py

    names = ["kernel:0"] if weights == 1 else [f"w{i}:0" for i in range(weights)]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"conv1_conv"]
        g = f.create_group("conv1_conv")
        g.attrs["weight_names"] = [n.encode() for n in names]
        for name in names:
            make(g, name)
    return path


@pytest.mark.slow
def test_h5_hostile_files_are_refused_in_bounded_memory(tmp_path):
    import h5py

    def unwritten(g, name):  # chunked, never written: HDF5 stores nothing and reads fill values
        g.create_dataset(name, shape=(20000, 20000), dtype="f4", chunks=(1000, 1000))

    def gzip_bomb(g, name):  # 1 GiB of zeros in 4 MiB gzip chunks of 4 KB each
        d = g.create_dataset(name, shape=(16384, 16384), dtype="f4", chunks=(1024, 1024),
                             compression="gzip")
        chunk = zlib.compress(bytes(4 * MIB))
        for i in range(16):
            for j in range(16):
                d.id.write_direct_chunk((i * 1024, j * 1024), chunk)

    def small_unwritten(g, name):  # 15 MiB each, under SMALL_BYTES: only the sum can tell
        g.create_dataset(name, shape=(2000, 2000), dtype="f4", chunks=(500, 500))

    def strings(g, name):
        g.create_dataset(name, data=["a", "b"], dtype=h5py.string_dtype())

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"another file's bytes")

    def external(g, name):  # the data lives in another file on the reader's disk
        g.create_dataset(name, shape=(8,), dtype="u1", external=[(str(secret), 0, 8)])

    cases = {
        "unwritten": (_keras2_h5(tmp_path / "unwritten.h5", unwritten),
                      r"WeightsError: .*kernel:0 of shape \(20000, 20000\) declares 1.5 GiB from "
                      r"0 B stored"),
        "gzip bomb": (_keras2_h5(tmp_path / "bomb.h5", gzip_bomb),
                      r"WeightsError: .*declares 1.0 GiB from .* KiB stored .*compression bomb"),
        "24 x 15 MiB unwritten": (_keras2_h5(tmp_path / "small.h5", small_unwritten, 24),
                                  r"WeightsError: .*its data in total declares 30.5 MiB from 0 B"),
        "strings": (_keras2_h5(tmp_path / "strings.h5", strings),
                    r"WeightsError: .*kernel:0 holds object, not numbers"),
        "external": (_keras2_h5(tmp_path / "external.h5", external),
                     r"WeightsError: .*refers to data in other files"),
    }
    assert max(os.path.getsize(p) for p, _ in cases.values()) < 2 * MIB
    _probe("facejax.convert.keras_h5:read_h5", cases, preload=("h5py",))


# ---- safetensors -----------------------------------------------------------------------------

def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(header + data)
    return path


@pytest.mark.slow
def test_safetensors_hostile_files_are_refused_in_bounded_memory(tmp_path):
    huge = json.dumps({"w": {"dtype": "F32", "shape": [20000, 20000],
                             "data_offsets": [0, 1_600_000_000]}}).encode()
    cases = {
        "header length 2**62": (_safetensors(tmp_path / "a.safetensors", struct.pack(
            "<Q", 1 << 62) + b"{}"), r"WeightsError: cannot read safetensors .*header too large"),
        "header past the end": (_safetensors(tmp_path / "b.safetensors", struct.pack(
            "<Q", 5000) + b"{}"), r"WeightsError: cannot read safetensors .*invalid header"),
        "offsets past the end": (_safetensors(tmp_path / "c.safetensors", struct.pack(
            "<Q", len(huge)) + huge, bytes(4)), r"WeightsError: cannot read safetensors"),
    }
    _probe("facejax.convert.torchvision:load_state_dict", cases, preload=("safetensors.numpy",))


# ---- dlib .dat -------------------------------------------------------------------------------

def _dlib_int(v: int) -> bytes:
    mag = abs(int(v))
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def _real_dat() -> bytes:
    spec = importlib.util.find_spec("face_recognition_models")  # never imported: pkg_resources
    if spec is None:
        pytest.fail("face_recognition_models is missing: pip install -e '.[parity]'",
                    pytrace=False)
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / \
        "dlib_face_recognition_resnet_model_v1.dat"
    return path.read_bytes()


@pytest.mark.slow
@pytest.mark.parity
def test_dlib_hostile_files_are_refused_in_bounded_memory(tmp_path):
    real = _real_dat()
    # The stem conv's parameter tensor: version 2, dims (4736, 1, 1, 1), then its floats.
    stem = b"\x01\x02" + _dlib_int(4736) + b"\x01\x01" * 3
    at = real.index(stem)
    huge = real[:at] + b"\x01\x02" + _dlib_int(20000) * 2 + b"\x01\x01" * 2 + \
        real[at + len(stem):at + len(stem) + 4096]
    loss = _dlib_int(1) + _dlib_int(13) + b"loss_metric_2"
    sparse = tmp_path / "sparse.dat"
    with open(sparse, "wb") as f:
        f.truncate(5 << 30)  # 5 GiB of holes: no disk used, but a whole-file read is 5 GiB
    cases = {
        "20000x20000 tensor": ((tmp_path / "huge.dat"), r"WeightsError: .*is truncated: .*"
                               r"\(20000, 20000, 1, 1\) tensor \(1600000000 bytes\)"),
        "exponent beyond int16": ((tmp_path / "exp.dat"),
                                  r"WeightsError: .*float exponent 1099511627776 out of range"),
        "float overflow": ((tmp_path / "inf.dat"), r"WeightsError: .*truncated"),
        "5 GiB file": (sparse, r"WeightsError: .*the file declares 5.0 GiB, more than the "
                       r"4.0 GiB"),
    }
    (tmp_path / "huge.dat").write_bytes(huge)
    (tmp_path / "exp.dat").write_bytes(loss + _dlib_int(1) + _dlib_int(1 << 40))
    (tmp_path / "inf.dat").write_bytes(loss + _dlib_int(1) + _dlib_int(5000))  # margin = inf
    _probe("facejax.convert.dlib_dat:read_dat", cases)
