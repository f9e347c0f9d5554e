"""Losses: softmax cross-entropy with label smoothing, ArcFace and CosFace margins, checks."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_common_configs

from facejax.errors import ConfigError
from facejax.train.losses import LossConfig, classification_loss, margin_logits


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_softmax_cross_entropy_with_label_smoothing_matches_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 4)).astype(np.float32)
    labels = np.array([0, 3, 1, 2, 3], np.int32)
    eps = 0.1
    targets = np.full((5, 4), eps / 4) + (1 - eps) * np.eye(4)[labels]
    want = -(targets * _log_softmax(logits)).sum(-1)
    got = classification_loss(jnp.asarray(logits), jnp.asarray(labels),
                              LossConfig(label_smoothing=eps))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_arcface_and_cosface_change_only_the_target_logit():
    cos = np.array([[0.8, 0.1, -0.3], [0.2, 0.5, 0.9]], np.float32)
    labels = np.array([0, 2], np.int32)
    s, m = 10.0, 0.3
    arc = np.asarray(margin_logits(jnp.asarray(cos), jnp.asarray(labels),
                                   LossConfig("arcface", scale=s, margin=m, cosine_head=True)))
    cosface = np.asarray(margin_logits(jnp.asarray(cos), jnp.asarray(labels),
                                       LossConfig("cosface", scale=s, margin=m, cosine_head=True)))
    for i, y in enumerate(labels):
        theta = math.acos(cos[i, y])
        assert arc[i, y] == pytest.approx(s * math.cos(theta + m), rel=1e-5)
        assert cosface[i, y] == pytest.approx(s * (cos[i, y] - m), rel=1e-5)
        others = [j for j in range(3) if j != y]
        np.testing.assert_allclose(arc[i, others], s * cos[i, others], rtol=1e-6)
        np.testing.assert_allclose(cosface[i, others], s * cos[i, others], rtol=1e-6)


@pytest.mark.slow
def test_arcface_stays_monotonic_past_pi_minus_margin():
    # theta + m > pi would make cos(theta + m) grow again; the fallback keeps it decreasing.
    m = 0.5
    cos = jnp.linspace(-1.0, 1.0, 201)[:, None] * jnp.ones((1, 2))
    labels = jnp.zeros(201, jnp.int32)
    target = np.asarray(margin_logits(cos, labels, LossConfig("arcface", scale=1.0, margin=m,
                                                              cosine_head=True)))[:, 0]
    assert np.all(np.diff(target) > 0)


def test_margin_loss_is_higher_than_plain_normface():
    cos = jnp.array([[0.6, 0.2, 0.1]])
    labels = jnp.array([0])
    plain = classification_loss(cos, labels, LossConfig("softmax", cosine_head=True))
    arc = classification_loss(cos, labels, LossConfig("arcface", margin=0.3, cosine_head=True))
    cosface = classification_loss(cos, labels, LossConfig("cosface", margin=0.3,
                                                          cosine_head=True))
    assert float(arc[0]) > float(plain[0]) and float(cosface[0]) > float(plain[0])


def test_loss_config_rejects_bad_settings():
    c = load_common_configs().base()
    c.train.loss = "arcface"
    with pytest.raises(ConfigError, match="model.head=cosine"):
        LossConfig.from_config(c)
    c.model.head = "cosine"
    assert LossConfig.from_config(c).cosine_head
    c.train.loss = "triplet"
    with pytest.raises(ConfigError, match="train.loss"):
        LossConfig.from_config(c)
    c.train.loss = "softmax"
    c.train.label_smoothing = 1.5
    with pytest.raises(ConfigError, match="label_smoothing"):
        LossConfig.from_config(c)


@pytest.mark.slow
def test_arcface_gradient_is_finite_when_a_cosine_is_exactly_one():
    """An imprinted head on a one-image class gives cos = 1.0 exactly; sqrt'(0) used to make
    the step NaN (a no-augmentation fine-tune of dlib's model diverged on its first steps)."""
    import jax

    cfg = LossConfig(kind="arcface", scale=30.0, margin=0.3, cosine_head=True)
    cos = jnp.array([[1.0, 0.2, -0.1], [0.3, -1.0, 0.999999]])
    labels = jnp.array([0, 1])
    grad = jax.grad(lambda c: classification_loss(c, labels, cfg).mean())(cos)
    assert np.all(np.isfinite(np.asarray(grad)))
    # Away from the poles the floor changes nothing: cos(theta + m) exactly.
    out = margin_logits(jnp.array([[0.5, 0.1]]), jnp.array([0]), cfg)
    np.testing.assert_allclose(float(out[0, 0]), 30 * math.cos(math.acos(0.5) + 0.3), rtol=1e-6)
