"""Exported embedder: parity with the in-process model, symbolic batch, errors, resumable shards."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.errors import CheckpointError, DataError
from facejax.retrieval import embed, integrity

pytestmark = pytest.mark.slow  # every test here takes seconds: not in ./run.sh test --fast

SIZE = 16


class TinyEmbedNet(nnx.Module):
    """Conv + BatchNorm + projection + L2: the shape of a real embedder at toy size."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.proj = nnx.Linear(8, 6, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.bn(self.conv(x), use_running_average=True))
        x = self.proj(x.mean(axis=(1, 2)))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _model_and_fn():
    model = TinyEmbedNet(nnx.Rngs(0))
    # Non-trivial running stats so the test sees them travel through the artifact.
    model.bn.mean[...] = jnp.linspace(-0.2, 0.3, 8)
    model.bn.var[...] = jnp.linspace(0.5, 2.0, 8)
    graphdef, state = nnx.split(model)

    def fn(state, images_u8):
        x = images_u8.astype(jnp.float32) / 255.0
        x = jax.image.resize(x, (x.shape[0], 12, 12, 3), "bilinear")
        return nnx.merge(graphdef, state)((x - 0.5) / 0.25)

    return state, fn


META = dict(model="tiny", input_size=SIZE, resize_mode="crop", normalization="unit")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    state, fn = _model_and_fn()
    out = str(tmp_path_factory.mktemp("emb") / "embedder")
    meta = embed.export_embedder(fn, state, META, out)
    return out, meta, state, fn


def test_export_parity_and_symbolic_batch(artifact):
    out, meta, state, fn = artifact
    assert sorted(os.listdir(out)) == ["embedder.bin", "embedder.json", "params.bin"]
    emb = embed.load_embedder(out)
    assert emb.meta["embed_dim"] == 6 and emb.meta["l2_normalized"] is True
    assert emb.meta["params_hash"] == meta["params_hash"]
    rng = np.random.default_rng(1)
    for b in (1, 3, 17):
        x = rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8)
        want = np.asarray(jax.jit(fn)(state, x))
        got = emb(x)
        assert got.shape == (b, 6) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_embed_array_pads_and_follows_indices(artifact):
    out, _, state, fn = artifact
    emb = embed.load_embedder(out)
    x = np.random.default_rng(2).integers(0, 256, (11, SIZE, SIZE, 3), dtype=np.uint8)
    want = np.asarray(jax.jit(fn)(state, x))
    np.testing.assert_allclose(emb.embed_array(x, batch_size=4, progress=False), want, atol=1e-6)
    idx = np.array([10, 0, 5])
    np.testing.assert_allclose(emb.embed_array(x, batch_size=4, progress=False, indices=idx),
                               want[idx], atol=1e-6)
    # Batches running on several threads land in their own rows, whatever order they finish in.
    idx = np.random.default_rng(3).permutation(11)
    for threads in (1, 2, 3, 8):
        np.testing.assert_allclose(emb.embed_array(x, batch_size=2, progress=False, indices=idx,
                                                   threads=threads), want[idx], atol=1e-6)


def test_meta_and_hash_recorded(artifact):
    out, meta, state, _ = artifact
    leaves = jax.tree_util.tree_leaves(state)
    assert meta["params_hash"] == embed.params_hash([np.asarray(a) for a in leaves])
    with open(os.path.join(out, "embedder.json")) as f:
        on_disk = json.load(f)
    for key in ("cache_size", "resize_mode", "normalization", "model", "embed_dim", "metric",
                "l2_normalized", "facejax_version", "created"):
        assert key in on_disk
    assert on_disk["cache_size"] == SIZE and on_disk["metric"] == "dot"
    assert "input_size" not in on_disk  # the cache size's old name


def test_an_old_embedder_json_with_input_size_loads(artifact, tmp_path):
    """Artifacts exported before the rename name the cache size input_size: they still load,
    with the cache size under its new name."""
    out, _, state, fn = artifact
    old = tmp_path / "embedder"
    shutil.copytree(out, old)
    meta = json.loads((old / "embedder.json").read_text())
    meta["input_size"] = meta.pop("cache_size")
    del meta["manifest_sha256"]
    (old / "embedder.json").write_text(json.dumps(integrity.seal(meta)))
    emb = embed.load_embedder(str(old))
    assert emb.cache_size == SIZE and emb.meta["cache_size"] == SIZE
    assert "input_size" not in emb.meta
    assert embed.read_embedder_meta(str(old))["cache_size"] == SIZE
    x = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(emb(x), np.asarray(jax.jit(fn)(state, x)), atol=1e-6)


def test_wrong_input_is_a_data_error(artifact):
    emb = embed.load_embedder(artifact[0])
    with pytest.raises(DataError, match="uint8 images"):
        emb(np.zeros((2, SIZE + 1, SIZE, 3), np.uint8))
    with pytest.raises(DataError, match="uint8"):
        emb(np.zeros((2, SIZE, SIZE, 3), np.float32))


def test_missing_and_corrupt_artifacts(artifact, tmp_path):
    with pytest.raises(CheckpointError, match="no exported embedder"):
        embed.load_embedder(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("embedder.bin", "embedder.json", "params.bin"):
        shutil.copy(os.path.join(artifact[0], name), bad / name)
    (bad / "embedder.bin").write_bytes(b"\x00garbage")
    # (not match="corrupt": this test's own tmp_path holds that word)
    with pytest.raises(CheckpointError, match="embedder.bin is 8 bytes, the manifest says"):
        embed.load_embedder(str(bad))
    shutil.copy(os.path.join(artifact[0], "embedder.bin"), bad / "embedder.bin")
    params = bytearray((bad / "params.bin").read_bytes())
    params[-1] ^= 0xFF
    (bad / "params.bin").write_bytes(bytes(params))
    with pytest.raises(CheckpointError, match="params_hash"):
        embed.load_embedder(str(bad))
    (bad / "params.bin").write_bytes(bytes(params[:10]))
    with pytest.raises(CheckpointError, match="truncated"):
        embed.load_embedder(str(bad))
    (bad / "embedder.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        embed.load_embedder(str(bad))


def test_embed_to_shards_resumes(artifact, tmp_path):
    emb = embed.load_embedder(artifact[0])
    x = np.random.default_rng(3).integers(0, 256, (10, SIZE, SIZE, 3), dtype=np.uint8)
    idx = np.arange(10)[::-1]
    paths = [f"p{i}.jpg" for i in idx]
    work = str(tmp_path / "work")
    first = embed.embed_to_shards(emb, x, idx, paths, work, shard_size=4, batch_size=4,
                                  progress=False)
    np.testing.assert_allclose(first, emb(x[idx]), atol=1e-6)
    shards = sorted(n for n in os.listdir(work) if n.startswith("shard_"))
    assert shards == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    # A finished shard is reused as is: mark it, and the marker comes back.
    marked = np.load(os.path.join(work, shards[1]))
    marked[:] = 7.0
    np.save(os.path.join(work, shards[1]), marked)
    os.remove(os.path.join(work, shards[2]))
    again = embed.embed_to_shards(emb, x, idx, paths, work, shard_size=4, batch_size=4,
                                  progress=False)
    assert np.all(again[4:8] == 7.0)
    np.testing.assert_allclose(again[8:], first[8:], atol=1e-6)
    # A different item list invalidates the old shards.
    fresh = embed.embed_to_shards(emb, x, idx, [p + "x" for p in paths], work, shard_size=4,
                                  batch_size=4, progress=False)
    np.testing.assert_allclose(fresh, first, atol=1e-6)


def test_sharded_over_fake_devices(artifact):
    """The 1-device artifact runs data-parallel on a 4-device mesh and gives the same numbers."""
    out = artifact[0]
    code = textwrap.dedent(f"""
        import numpy as np, jax
        from facejax.retrieval import embed
        assert len(jax.devices()) == 4
        emb = embed.load_embedder({out!r})
        x = np.random.default_rng(0).integers(0, 256, (7, {SIZE}, {SIZE}, 3), dtype=np.uint8)
        a = emb.embed_array(x, batch_size=5, progress=False)
        np.save({out!r} + "/../sharded.npy", a)
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    got = np.load(os.path.join(out, "..", "sharded.npy"))
    x = np.random.default_rng(0).integers(0, 256, (7, SIZE, SIZE, 3), dtype=np.uint8)
    np.testing.assert_allclose(got, embed.load_embedder(out)(x), atol=1e-6)
