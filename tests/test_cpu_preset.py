"""The CPU inference preset (facejax.cpu_preset): the user's XLA_FLAGS win, it can be turned off,
a bad setting is a one-line error in every inference entry point, and embeddings are unchanged."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax import cpu_preset
from facejax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = "--xla_force_host_platform_device_count"
ENTRY_POINTS = ("build_index.py", "eval_topk.py", "eval_verification.py", "search.py", "serve.py")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_preset.ENV)}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **extra)
    return env


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(**env),
                          capture_output=True, text=True, timeout=300)


def test_merge_appends_only_the_flags_the_user_did_not_set():
    preset = (f"{DEVICES}=2", "--xla_cpu_enable_fast_math=false")
    assert cpu_preset.merge_flags("", preset) == " ".join(preset)
    # The user's own value of a preset flag wins, whatever its spelling; other flags stay.
    user = f"--xla_dump_to=/tmp/x -{DEVICES.lstrip('-')}=5"
    assert cpu_preset.merge_flags(user, preset) == f"{user} --xla_cpu_enable_fast_math=false"
    assert cpu_preset.merge_flags(" ".join(preset), preset) == " ".join(preset)  # idempotent
    assert cpu_preset.preset_flags(cpus=1) == ()  # one core: nothing to split over
    assert f"{DEVICES}=2" in cpu_preset.preset_flags(cpus=2)


@pytest.mark.parametrize("value", ["maybe", "2", "of"])
def test_an_unknown_setting_is_a_config_error(value):
    with pytest.raises(ConfigError, match=f"{cpu_preset.ENV}=.*0 to turn the CPU preset off"):
        cpu_preset.apply({cpu_preset.ENV: value}, preset=(f"{DEVICES}=2",))


def test_off_and_user_flags_leave_xla_flags_alone():
    env = {cpu_preset.ENV: "Off", "XLA_FLAGS": "--xla_dump_to=/x"}
    assert cpu_preset.apply(env, preset=(f"{DEVICES}=2",)) == []
    assert env["XLA_FLAGS"] == "--xla_dump_to=/x"
    env = {"XLA_FLAGS": f"{DEVICES}=1"}
    assert cpu_preset.apply(env, preset=(f"{DEVICES}=2",)) == []
    assert env["XLA_FLAGS"] == f"{DEVICES}=1"
    env = {"JAX_NUM_CPU_DEVICES": "4"}  # jax's own device-count setting is the user's too
    assert cpu_preset.apply(env, preset=(f"{DEVICES}=2",)) == [] and "XLA_FLAGS" not in env


def test_after_jax_started_nothing_changes_and_a_note_says_so():
    # This process has run jax already (the imports above and any earlier test).
    jax.devices()
    env = {"XLA_FLAGS": "--xla_dump_to=/x"}
    assert cpu_preset.apply(env, preset=(f"{DEVICES}=2",)) == []
    assert env["XLA_FLAGS"] == "--xla_dump_to=/x"


@pytest.mark.slow
def test_the_preset_sets_devices_and_the_users_flag_wins():
    code = """
        from facejax import cpu_preset
        cpu_preset.apply()
        import jax
        print("devices", len(jax.devices()))
    """
    want = 2 if cpu_preset.preset_flags() else 1
    assert f"devices {want}" in _python(code).stdout
    assert "devices 1" in _python(code, FACEJAX_CPU_PRESET="0").stdout
    assert "devices 3" in _python(code, XLA_FLAGS=f"{DEVICES}=3").stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_inference_entry_point_checks_the_setting_first(script, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--workdir",
                        str(tmp_path / "no_run")], env=_env(FACEJAX_CPU_PRESET="fast"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cpu_preset.ENV}='fast'"), p.stderr


class _TinyEmbedNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.proj = nnx.Linear(16, 6, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv(x))))
        x = self.proj(x.mean(axis=(1, 2)))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_embeddings_are_unchanged_by_the_preset(tmp_path):
    """The exported embedder gives the same embeddings with and without the preset (float32,
    atol 1e-5): single calls of odd batch sizes (padded over the devices) and embed_array. A
    single query runs on one device (Embedder.small_batch), the same as split over two."""
    from facejax.retrieval import embed

    model = _TinyEmbedNet(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    out = str(tmp_path / "embedder")
    embed.export_embedder(
        lambda p, x: nnx.merge(graphdef, p)(x.astype(jnp.float32) / 255.0), params,
        dict(model="tiny", cache_size=24, resize_mode="resize", normalization="none"), out)
    code = f"""
        import numpy as np
        from facejax import cpu_preset
        cpu_preset.apply()
        import jax
        from facejax.retrieval import embed
        emb = embed.load_embedder({out!r})
        x = np.random.default_rng(0).integers(0, 256, (11, 24, 24, 3), dtype=np.uint8)
        a = emb.embed_array(x, batch_size=4, progress=False)
        b = np.concatenate([emb(x[:1]), emb(x[1:8]), emb(x[8:])])
        if emb.num_devices > 1:  # the one-device path for a single query vs the split one
            one, calls = emb._fn_one, []
            emb._fn_one = lambda *a: calls.append(len(a[1])) or one(*a)
            single = emb(x[:1])
            emb(x[1:3])  # two images split over the devices
            assert calls == [1], calls
            emb.small_batch = 0
            np.testing.assert_allclose(emb(x[:1]), single, atol=1e-5)
            assert calls == [1], calls
        np.save({str(tmp_path)!r} + "/" + str(len(jax.devices())) + ".npy", np.stack([a, b]))
    """
    for env in ({}, {"FACEJAX_CPU_PRESET": "0"}):
        p = _python(code, **env)
        assert p.returncode == 0, p.stderr
    preset_devices = 2 if cpu_preset.preset_flags() else 1
    assert os.path.exists(tmp_path / "1.npy") and os.path.exists(tmp_path / f"{preset_devices}.npy")
    np.testing.assert_allclose(np.load(tmp_path / f"{preset_devices}.npy"),
                               np.load(tmp_path / "1.npy"), atol=1e-5)


@pytest.mark.slow
def test_bf16_opt_in_embeddings_keep_cosine_above_0_99():
    """bf16 stays an opt-in (export --compute_dtype bfloat16); its ResNet18 embeddings of the
    same weights stay within cosine 0.99 of float32's."""
    from facejax.models import create_model

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)), jnp.float32)
    f32 = create_model("resnet18", num_classes=10, rngs=nnx.Rngs(0))
    bf16 = create_model("resnet18", num_classes=10, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    nnx.update(bf16, nnx.state(f32))
    a = np.asarray(f32.embed(x, train=False), np.float32)
    b = np.asarray(bf16.embed(x, train=False), np.float32)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert b.dtype == np.float32 and cos.min() > 0.99, cos
    assert not np.allclose(a, b, atol=1e-6)  # bf16 really ran: the numbers differ a little
