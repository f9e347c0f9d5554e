"""Integrity of saved artifacts: every index and embedder file is hashed in its manifest and
checked on load; damage is a one-line CheckpointError naming the file and what to do."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from facejax.errors import CheckpointError
from facejax.retrieval import embed
from facejax.retrieval import index as I

D = 16
META = dict(model="tiny", params_hash="a" * 64, embed_dim=D, normalization="unit",
            l2_normalized=True, metric="dot", input_size=16, resize_mode="crop")
REBUILD = "rebuild it with scripts/build_index.py"
REEXPORT = "export it again (scripts/export.py"


def _gallery(n, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(9).standard_normal((20, D))
    labels = rng.integers(0, 20, n).astype(np.int32)
    x = centers[labels] + 0.4 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved exact index and one ScaNN index (1,200 items: a real tree and AH codes)."""
    root = tmp_path_factory.mktemp("saved")
    x, y = _gallery(1200)
    paths = [f"id{label}/img{i}.jpg" for i, label in enumerate(y)]
    info = dict(label_names=[f"id{i}" for i in range(20)])
    out = {}
    for backend in ("exact", "scann"):
        idx = I.SearchIndex.build(x, paths, y, META, backend=backend, info=info)
        idx.save(str(root / backend))
        out[backend] = str(root / backend)
    return out


def _copy(src, tmp_path, name="index"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _flip(path, pos=None, mask=0xFF):
    raw = bytearray(path.read_bytes())
    pos = len(raw) // 2 if pos is None else pos
    raw[pos] ^= mask
    path.write_bytes(bytes(raw))


def _strip_hashes(path, name="manifest.json"):
    """The manifest as facejax wrote it before hashes existed: no file table, no seal."""
    manifest = json.loads((path / name).read_text())
    manifest.pop("files", None), manifest.pop("manifest_sha256", None)
    (path / name).write_text(json.dumps(manifest))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                  for d, _, names in os.walk(root) for f in names)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["exact", "scann"])
def test_every_index_file_is_hashed_and_any_flipped_byte_is_named(saved, tmp_path, backend):
    manifest = json.loads(open(os.path.join(saved[backend], "manifest.json")).read())
    files = [f for f in _files(saved[backend]) if f != "manifest.json"]
    assert sorted(manifest["files"]) == files
    assert all(len(e["sha256"]) == 64 and e["bytes"] >= 0 for e in manifest["files"].values())
    for name in files:
        path = _copy(saved[backend], tmp_path, name.replace("/", "_"))
        _flip(path / name)
        with pytest.raises(CheckpointError) as e:
            I.load_index(str(path), expect=META)
        msg = str(e.value)
        assert f"{name} does not match its sha256" in msg and REBUILD in msg, msg
        assert "\n" not in msg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["embeddings.npy", "labels.npy", "ids.npy"])
@pytest.mark.parametrize("hashed", [True, False])
def test_zero_byte_arrays_are_named(saved, tmp_path, name, hashed):
    path = _copy(saved["exact"], tmp_path)
    if not hashed:
        _strip_hashes(path)
    (path / name).write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        I.load_index(str(path))
    want = f"{name} is 0 bytes" if hashed else f"{name} is damaged (EOFError"
    assert want in str(e.value) and REBUILD in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("hashed", [True, False])
def test_a_label_out_of_range_is_refused(saved, tmp_path, hashed):
    """labels.npy rewritten as a valid array holding -65529: caught by the hash, and without
    one (an index from an older facejax) by the range check."""
    path = _copy(saved["exact"], tmp_path)
    if not hashed:
        _strip_hashes(path)
    labels = np.load(path / "labels.npy")
    labels[7] = -65529
    np.save(path / "labels.npy", labels)
    with pytest.raises(CheckpointError) as e:
        I.load_index(str(path))
    want = ("labels.npy does not match its sha256" if hashed
            else "labels.npy holds labels from -65529 to 19, outside -1..19")
    assert want in str(e.value)


@pytest.mark.slow
def test_old_index_loads_with_a_note_and_gains_hashes_on_save(saved, tmp_path, capsys):
    path = _copy(saved["scann"], tmp_path)
    _strip_hashes(path)
    capsys.readouterr()
    old = I.load_index(str(path), expect=META)
    assert "has no file hashes (saved by an older facejax)" in capsys.readouterr().out
    assert old.size == 1200
    old.save(str(path))
    again = I.load_index(str(path), expect=META)
    assert "no file hashes" not in capsys.readouterr().out
    np.testing.assert_array_equal(again.search(old.embeddings[:5], 3)[0],
                                  old.search(old.embeddings[:5], 3)[0])


@pytest.mark.slow
def test_an_edited_manifest_is_refused(saved, tmp_path):
    path = _copy(saved["exact"], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["info"]["label_names"][3] = "somebody else"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="manifest.json does not match its "
                                              "manifest_sha256 .damaged or edited by hand"):
        I.load_index(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("hashed", [True, False])
def test_damaged_scann_token_file(saved, tmp_path, hashed):
    """Out-of-range leaf tokens: ScaNN itself raised IndexError from inside its loader."""
    path = _copy(saved["scann"], tmp_path)
    if not hashed:
        _strip_hashes(path)
    token = path / "scann" / "datapoint_to_token.npy"
    _flip(token, 200)
    _flip(token, len(token.read_bytes()) - 3, 0x7F)
    with pytest.raises(CheckpointError) as e:
        I.load_index(str(path))
    want = ("scann/datapoint_to_token.npy does not match its sha256" if hashed
            else "cannot load the ScaNN searcher in scann/ (IndexError")
    assert want in str(e.value) and REBUILD in str(e.value)


# ----------------------------------------------------------------------------- embedder

def _embed_fn(params, images_u8):
    x = images_u8.astype(jnp.float32).mean(axis=(1, 2)) / 255.0
    x = jnp.tanh(x @ params["w"] + params["b"])
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "embedder"
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 8)).astype(np.float32),
              "b": rng.standard_normal(8).astype(np.float32)}
    embed.export_embedder(_embed_fn, params, dict(model="toy", input_size=8, resize_mode="crop",
                                                  normalization="unit"), str(out))
    return out


def _module_offset(raw: bytes) -> int:
    """Where the serialized StableHLO module starts inside embedder.bin."""
    module = bytes(jax.export.deserialize(bytearray(raw)).mlir_module_serialized)
    offset = raw.find(module)
    assert offset > 0
    return offset


def test_embedder_bin_is_hashed_and_single_byte_flips_are_named(artifact, tmp_path):
    meta = json.loads((artifact / "embedder.json").read_text())
    assert set(meta["files"]) == {"embedder.bin"} and "manifest_sha256" in meta
    raw = (artifact / "embedder.bin").read_bytes()
    start = _module_offset(raw)
    # Flatbuffer header, the module's magic number and body, the tail.
    for pos in (4, start + 1, start + (len(raw) - start) // 2, len(raw) - 5):
        path = _copy(artifact, tmp_path, f"e{pos}")
        _flip(path / "embedder.bin", pos)
        with pytest.raises(CheckpointError) as e:
            embed.load_embedder(str(path))
        msg = str(e.value)
        assert "embedder.bin does not match its sha256" in msg and REEXPORT in msg, msg
    path = _copy(artifact, tmp_path, "empty")
    (path / "embedder.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="embedder.bin is 0 bytes"):
        embed.load_embedder(str(path))


def test_an_old_embedder_loads_with_a_note_and_a_damaged_module_fails_at_load(
        artifact, tmp_path, capsys):
    """Without a hash, a module that does not parse is caught at load, not at the first call
    (which raised JaxRuntimeError: Failed to deserialize StableHLO)."""
    bad = _copy(artifact, tmp_path, "bad")
    _strip_hashes(bad, "embedder.json")
    raw = (bad / "embedder.bin").read_bytes()
    _flip(bad / "embedder.bin", _module_offset(raw) + 1)
    with pytest.raises(CheckpointError) as e:
        embed.load_embedder(str(bad))
    assert "embedder.bin is damaged: it does not load" in str(e.value)
    assert REEXPORT in str(e.value) and "\n" not in str(e.value)
    # Undamaged, it loads (with a note) and embeds as the hashed artifact does.
    path = _copy(artifact, tmp_path, "old")
    _strip_hashes(path, "embedder.json")
    capsys.readouterr()
    x = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.testing.assert_allclose(embed.load_embedder(str(path))(x),
                               embed.load_embedder(str(artifact))(x), atol=1e-6)
    assert "has no hash of embedder.bin (exported by an older facejax)" in capsys.readouterr().out


def test_an_edited_embedder_json_is_refused(artifact, tmp_path):
    path = _copy(artifact, tmp_path)
    meta = json.loads((path / "embedder.json").read_text())
    meta["normalization"] = "torch"
    (path / "embedder.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="embedder.json does not match its manifest_sha256"):
        embed.load_embedder(str(path))
