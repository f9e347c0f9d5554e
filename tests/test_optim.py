"""Schedules, weight-decay masks and fine-tuning policies; frozen parameters never change."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from facejax.config import load_config
from facejax.errors import ConfigError
from facejax.train import optim
from facejax.train import state as state_lib
from facejax.train.losses import LossConfig
from facejax.sharding import make_data_mesh, replicated
from facejax.train.step import jit_train_step

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


def tiny(**overrides):
    return load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])


def schedule(**kw):
    return optim.make_schedule(tiny(**{f"train.{k}": v for k, v in kw.items()}).train,
                               steps_per_epoch=10, total_steps=100)


def test_step_schedule_decays_once_per_epoch():
    s = schedule(schedule="step", learning_rate=0.1, decay_rate=0.5)
    assert [float(s(i)) for i in (0, 9, 10, 19, 20)] == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.025])


def test_exponential_schedule_is_smooth():
    s = schedule(schedule="exponential", learning_rate=0.1, decay_rate=0.5)
    assert float(s(5)) == pytest.approx(0.1 * 0.5 ** 0.5, rel=1e-5)


def test_warmup_then_cosine():
    s = schedule(schedule="cosine", learning_rate=0.2, warmup_epochs=1.0)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(0.1)
    assert float(s(10)) == pytest.approx(0.2)
    assert float(s(55)) == pytest.approx(0.1, rel=1e-4)  # half way through the cosine
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)


def test_one_cycle_matches_fastai_fit_one_cycle():
    # fastai: combined_cos(0.25, lr/25, lr, lr/1e5) over the whole run.
    lr, total = 0.01, 100
    s = schedule(schedule="one_cycle", learning_rate=lr)

    def fastai(step):
        pct = step / total
        if pct < 0.25:
            a, b, p = lr / 25, lr, pct / 0.25
        else:
            a, b, p = lr, lr / 1e5, (pct - 0.25) / 0.75
        return b + (a - b) / 2 * (1 + math.cos(math.pi * p))

    for step in (0, 10, 25, 40, 70, 100):
        assert float(s(step)) == pytest.approx(fastai(step), rel=1e-4, abs=1e-10)


def test_schedule_rejects_bad_values():
    with pytest.raises(ConfigError, match="train.schedule"):
        schedule(schedule="linear")
    with pytest.raises(ConfigError, match="warmup"):
        schedule(schedule="cosine", warmup_epochs=20.0)


def test_no_steps_means_no_warmup_check():
    """epochs=0 (score the starting point) with a warm-up in the config: no step is taken, so
    the warm-up cannot be 'longer than the run' (configs/dlib_resnet.py documents epochs=0)."""
    t = tiny(**{"train.schedule": "cosine", "train.warmup_epochs": 0.5,
                "train.learning_rate": 0.01}).train
    s = optim.make_schedule(t, steps_per_epoch=10, total_steps=0)
    assert float(s(0)) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="warmup"):  # one step is still checked
        optim.make_schedule(t, steps_per_epoch=10, total_steps=1)


def test_decay_mask_skips_biases_and_norm_scales():
    params = {"conv": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
              "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    assert optim.decay_mask(params) == {"conv": {"kernel": True, "bias": False},
                                        "bn": {"scale": False, "bias": False}}


def _labels(**overrides):
    config = tiny(**overrides)
    model = state_lib.build_model(config, 3)
    _, bundle, _, _ = state_lib.create_train_state(config, model, steps_per_epoch=4,
                                                   total_steps=8)
    return traverse_util.flatten_dict(bundle.labels, sep="/")


@pytest.mark.slow
def test_last_n_counts_layers_in_forward_order_not_name_order():
    labels = _labels(**{"train.finetune": "last_n", "train.trainable_last_n": 2})
    trainable = {k.rsplit("/", 1)[0] for k, v in labels.items() if v != "frozen"}
    # block3 runs conv1 -> bn -> conv2: its last two layers are bn and conv2 (by name the last
    # two would be conv1 and conv2). The classifier head always trains.
    assert trainable == {"backbone/block3_bn", "backbone/block3_conv2", "head"}


@pytest.mark.slow
def test_frozen_backbone_discriminative_lr_and_freeze_bn_labels():
    labels = _labels(**{"train.finetune": "frozen_backbone"})
    assert {v for k, v in labels.items() if k.startswith("backbone/")} == {"frozen"}
    assert labels["head/kernel"] == "trainable"
    labels = _labels(**{"train.backbone_lr_mult": 0.1, "train.freeze_bn": True})
    assert labels["backbone/block1_conv1/kernel"] == "backbone"
    assert labels["backbone/block1_bn/scale"] == "frozen"
    with pytest.raises(ConfigError, match="trainable_last_n"):
        _labels(**{"train.finetune": "last_n", "train.trainable_last_n": 99})


def _train(config, steps=3):
    """Runs `steps` train steps on random data; returns (initial state, final state, bundle)."""
    model = state_lib.build_model(config, 3)
    state, bundle, tx, _ = state_lib.create_train_state(config, model, steps_per_epoch=4,
                                                        total_steps=8)
    mesh = make_data_mesh()
    first = jax.tree.map(np.asarray, state)
    fn = jit_train_step(mesh, bundle=bundle, tx=tx, loss_cfg=LossConfig.from_config(config),
                        augment_cfg=config.augment, freeze_bn=bool(config.train.freeze_bn))
    state = jax.device_put(state, replicated(mesh))
    key = jax.random.key_data(jax.random.key(0))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = dict(image=rng.integers(0, 256, (8, 24, 24, 3), dtype=np.uint8),
                     label=rng.integers(0, 3, 8).astype(np.int32))
        state, _ = fn(state, batch, key)
    return first, jax.tree.map(np.asarray, state), bundle


@pytest.mark.slow
def test_frozen_parameters_stay_bit_identical():
    # last_n + freeze_bn freezes whole layers and BatchNorm scale/bias inside the open block;
    # AdamW with weight decay would move any parameter that leaked into an optimizer group.
    config = tiny(**{"train.optimizer": "adamw", "train.weight_decay": 0.1,
                     "train.learning_rate": 0.01, "train.finetune": "last_n",
                     "train.trainable_last_n": 2, "train.freeze_bn": True})
    first, last, bundle = _train(config)
    frozen = traverse_util.flatten_dict(bundle.frozen, sep="/")
    before = traverse_util.flatten_dict(first.params, sep="/")
    after = traverse_util.flatten_dict(last.params, sep="/")
    assert any(frozen.values()) and not all(frozen.values())
    for name, is_frozen in frozen.items():
        same = before[name].tobytes() == after[name].tobytes()
        assert same == is_frozen, name
    stats_same = [a.tobytes() == b.tobytes() for a, b in zip(
        jax.tree.leaves(first.batch_stats), jax.tree.leaves(last.batch_stats))]
    # freeze_bn also keeps the running statistics (BatchNorm runs in inference mode).
    assert all(stats_same)


@pytest.mark.slow
def test_backbone_lr_mult_scales_backbone_updates():
    base = {"train.optimizer": "sgd", "train.momentum": 0.0, "train.learning_rate": 0.05,
            "train.schedule": "constant"}
    first, full, _ = _train(tiny(**base), steps=1)
    _, slow, _ = _train(tiny(**base, **{"train.backbone_lr_mult": 0.25}), steps=1)
    d_full = full.params["backbone"]["block2_conv1"]["kernel"] - first.params["backbone"][
        "block2_conv1"]["kernel"]
    d_slow = slow.params["backbone"]["block2_conv1"]["kernel"] - first.params["backbone"][
        "block2_conv1"]["kernel"]
    np.testing.assert_allclose(d_slow, 0.25 * d_full, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(slow.params["head"]["kernel"], full.params["head"]["kernel"],
                               rtol=1e-6)
