"""Classification losses: softmax cross-entropy (label smoothing), ArcFace and CosFace margins."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from facejax.errors import ConfigError

LOSSES = ("softmax", "arcface", "cosface")
SIN2_FLOOR = 1e-6  # ArcFace floors sin(theta)^2 here: angles under 0.06 deg count as 0.06


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What `classification_loss` needs; built from `config.train` and `config.model.head`.

    `cosine_head`: the model's logits are cosines in [-1, 1] (model.head='cosine'); they are
    multiplied by `scale` before the softmax (plain softmax on a cosine head is NormFace).
    """

    kind: str = "softmax"
    label_smoothing: float = 0.0
    scale: float = 30.0
    margin: float = 0.3
    cosine_head: bool = False

    @classmethod
    def from_config(cls, config) -> LossConfig:
        t = config.train
        if t.loss not in LOSSES:
            raise ConfigError(f"train.loss must be one of {LOSSES}, got {t.loss!r}")
        cosine = config.model.head == "cosine"
        if t.loss != "softmax" and not cosine:
            raise ConfigError(
                f"train.loss={t.loss!r} needs cosine logits: set --config.model.head=cosine")
        if not 0.0 <= t.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
        if cosine and t.logit_scale <= 0:
            raise ConfigError(f"train.logit_scale must be > 0, got {t.logit_scale}")
        if t.loss == "arcface" and not 0.0 <= t.margin < math.pi / 2:
            raise ConfigError(f"train.margin (ArcFace, radians) must be in [0, pi/2), "
                              f"got {t.margin}")
        return cls(kind=t.loss, label_smoothing=float(t.label_smoothing),
                   scale=float(t.logit_scale), margin=float(t.margin), cosine_head=cosine)


def margin_logits(cos: jax.Array, labels: jax.Array, cfg: LossConfig) -> jax.Array:
    """Applies the additive margin to the target-class cosine, then the scale.

    ArcFace: cos(theta + m), falling back to cos(theta) - m*sin(m) where theta + m > pi so the
    target logit stays monotonic in theta (the insightface formulation). CosFace: cos - m.
    """
    cos = jnp.clip(cos.astype(jnp.float32), -1.0, 1.0)
    target = jnp.take_along_axis(cos, labels[:, None], axis=1)
    if cfg.kind == "arcface":
        m = cfg.margin
        # The floor keeps d(sin)/d(cos) finite at cos = +-1, which a class of one image hits
        # exactly with an imprinted head (sqrt'(0) = inf made the whole step NaN).
        sin = jnp.sqrt(jnp.clip(1.0 - target * target, SIN2_FLOOR, 1.0))
        phi = target * math.cos(m) - sin * math.sin(m)
        phi = jnp.where(target > math.cos(math.pi - m), phi, target - math.sin(math.pi - m) * m)
    elif cfg.kind == "cosface":
        phi = target - cfg.margin
    else:
        phi = target
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=cos.dtype)
    return cfg.scale * (cos + onehot * (phi - target))


def classification_loss(logits: jax.Array, labels: jax.Array, cfg: LossConfig) -> jax.Array:
    """Per-example loss [B] from logits [B, C] (cosines for a cosine head) and int labels [B]."""
    logits = logits.astype(jnp.float32)
    if cfg.cosine_head:
        logits = margin_logits(logits, labels, cfg)
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if cfg.label_smoothing:
        targets = optax.smooth_labels(targets, cfg.label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)
