"""The jitted train/eval steps on a tiny config: learning, mixed precision, margin losses, masks."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import class_colour

from facejax.config import load_config
from facejax.data.pipeline import to_global
from facejax.train import state as state_lib
from facejax.train.losses import LossConfig
from facejax.sharding import make_data_mesh, replicated
from facejax.train.step import jit_eval_step, jit_train_step, train_step

pytestmark = pytest.mark.slow  # every test here takes seconds: not in ./run.sh test --fast

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")
NUM_CLASSES = 4


def coloured_batch(rng, n=16, size=24):
    """Images whose class is their colour (plus noise): a problem a few steps can learn."""
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    colours = np.array([class_colour(k) for k in labels], np.int16)[:, None, None, :]
    noise = rng.integers(-40, 41, (n, size, size, 3))
    return dict(image=np.clip(colours + noise, 0, 255).astype(np.uint8), label=labels)


def run_steps(overrides, steps=12, seed=0):
    config = load_config(TINY, overrides)
    dtype = state_lib.compute_dtype(config.train.compute_dtype)
    model = state_lib.build_model(config, NUM_CLASSES, dtype=dtype)
    state, bundle, tx, _ = state_lib.create_train_state(config, model, steps_per_epoch=steps,
                                                        total_steps=steps)
    mesh = make_data_mesh()
    fn = jit_train_step(mesh, bundle=bundle, tx=tx, loss_cfg=LossConfig.from_config(config),
                        augment_cfg=config.augment, freeze_bn=False)
    state = jax.device_put(state, replicated(mesh))
    key = jax.random.key_data(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    history = []
    for _ in range(steps):
        state, metrics = fn(state, to_global(coloured_batch(rng), mesh), key)
        history.append(jax.device_get(metrics))
    return state, bundle, config, history, mesh


@pytest.fixture(scope="module")
def trained():
    return run_steps(["train.learning_rate=0.003", "train.schedule=constant"])


def test_train_step_learns_a_learnable_problem(trained):
    state, _, _, history, _ = trained
    losses = [float(h["loss"]) for h in history]
    assert int(state.step) == 12
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert np.mean([float(h["accuracy"]) for h in history[-3:]]) > 0.7


def test_bf16_compute_keeps_float32_params_and_trains_arcface():
    state, _, _, history, _ = run_steps(
        ["train.compute_dtype=bfloat16", "model.head=cosine", "train.loss=arcface",
         "train.logit_scale=16.0", "train.margin=0.2", "train.learning_rate=0.003",
         "train.schedule=constant", "model.embed_dim=16"])
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}
    losses = [float(h["loss"]) for h in history]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


def test_eval_step_ignores_padding_rows(trained):
    state, bundle, config, _, mesh = trained
    fn = jit_eval_step(mesh, bundle=bundle, loss_cfg=LossConfig.from_config(config))
    batch = coloured_batch(np.random.default_rng(1), n=8)
    full = jax.device_get(fn(state, to_global(dict(batch, mask=np.ones(8, bool)), mesh)))
    half = dict(image=batch["image"].copy(), label=batch["label"].copy(),
                mask=np.arange(8) < 4)
    half["image"][4:] = 0  # padding rows hold zeros and label 0
    half["label"][4:] = 0
    part = jax.device_get(fn(state, to_global(half, mesh)))
    ref = jax.device_get(fn(state, to_global(dict(batch, mask=np.arange(8) < 4), mesh)))
    assert float(part["count"]) == 4 and float(full["count"]) == 8
    np.testing.assert_allclose(part["loss_sum"], ref["loss_sum"], rtol=1e-6)
    assert float(part["correct"]) == float(ref["correct"])
    np.testing.assert_allclose(part["embedding"][:4], full["embedding"][:4], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(full["embedding"], axis=1), 1.0, rtol=1e-5)


def test_remat_dots_gives_the_same_steps_and_is_in_the_compiled_step():
    """train.remat=dots recomputes BatchNorm/ReLU/pooling in the backward: the same losses and
    parameters after a few steps (up to float order), and the step really holds a checkpoint
    (XLA:CPU saves no memory with it: BENCHMARKS.md "remat")."""
    base = ["train.learning_rate=0.003", "train.schedule=constant"]
    ref, _, _, ref_hist, mesh = run_steps(base, steps=3)
    got, bundle, config, hist, _ = run_steps(base + ["train.remat=dots"], steps=3)
    assert bundle.remat == "dots"
    np.testing.assert_allclose([float(h["loss"]) for h in hist],
                               [float(h["loss"]) for h in ref_hist], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    model = state_lib.build_model(config, NUM_CLASSES, dtype=jnp.float32)
    state, bundle, tx, _ = state_lib.create_train_state(config, model, steps_per_epoch=1,
                                                        total_steps=1)

    def jaxpr_text(bun):
        fn = functools.partial(train_step, bundle=bun, tx=tx,
                               loss_cfg=LossConfig.from_config(config),
                               augment_cfg=config.augment, freeze_bn=False)
        batch = coloured_batch(np.random.default_rng(0), n=4)
        return str(jax.make_jaxpr(fn)(state, batch, jax.random.key_data(jax.random.key(0))))

    assert "policy=DotsSaveable" in jaxpr_text(bundle)  # the remat primitive, with its policy
    assert "remat" not in jaxpr_text(dataclasses.replace(bundle, remat="none"))


def test_a_wrong_remat_name_is_a_clear_config_error():
    from facejax.errors import ConfigError
    with pytest.raises(ConfigError, match="train.remat must be one of"):
        run_steps(["train.remat=everything"], steps=1)
