"""The train state pytree and building the model, its split and its optimizer from a config."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from facejax.errors import ConfigError
from facejax.models import create_model, get_preset, get_spec
from facejax.train import optim

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# train.remat: what the backward pass keeps from the forward. "dots" keeps only convolution and
# matmul outputs and recomputes BatchNorm, activations and pooling from them (jax.checkpoint's
# dots_saveable policy): less activation memory for one more pass of the cheap ops.
REMAT_POLICIES = ("none", "dots")


@struct.dataclass
class TrainState:
    """Everything a step updates. Params, batch stats and opt state are pure dicts, float32."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """The static half of an `nnx.split` model plus what the step needs to run it.

    `other`: non-parameter, non-statistic variables (dropout rng streams); they are re-seeded
    from the step key on every call, so their stored values never matter.
    """

    graphdef: Any
    other: Any
    input_size: int
    normalization: str
    compute_dtype: Any
    frozen: Any  # pytree of bools like params: True = never updated
    labels: Any  # optim.param_labels
    remat: str = "none"  # REMAT_POLICIES

    def merge(self, params, batch_stats) -> nnx.Module:
        return nnx.merge(self.graphdef, params, batch_stats, self.other)


def compute_dtype(name: str, platform: str | None = None):
    """config.train.compute_dtype -> jnp dtype; 'auto' is bfloat16 on GPU/TPU, float32 on CPU."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"train.compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
    if name == "auto":
        platform = platform or jax.default_backend()
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name).type


def remat_policy(name: str):
    """config.train.remat -> a jax.checkpoint policy, or None for no rematerialisation."""
    if name not in REMAT_POLICIES:
        raise ConfigError(f"train.remat must be one of {REMAT_POLICIES}, got {name!r}")
    return None if name == "none" else jax.checkpoint_policies.dots_saveable


def resolve_input(config) -> tuple[int, str]:
    """(model input size, normalization preset) for config.model."""
    m = config.model
    preset = get_preset(m.name, m.weights_source)
    size = int(m.input_size) or int(preset.input_size)
    if size <= 0:
        raise ConfigError(f"model.input_size must be > 0, got {m.input_size}")
    return size, preset.normalization


def build_model(config, num_classes: int, *, dtype=jnp.float32, seed: int | None = None
                ) -> nnx.Module:
    """The config's model, randomly initialised (pretrained weights are merged by the loop)."""
    m = config.model
    size, _ = resolve_input(config)
    arch_kw = {}
    # Backbones whose layer sizes depend on the input (the scratch CNN's Flatten) take it here.
    backbone = get_spec(m.name).backbone
    init = backbone.__init__ if inspect.isclass(backbone) else backbone
    accepted = inspect.signature(init).parameters
    if "input_size" in accepted:
        arch_kw["input_size"] = size
    if m.bn_momentum:
        if "bn_momentum" not in accepted:
            raise ConfigError(f"model.bn_momentum: model {m.name!r} has no configurable "
                              "BatchNorm momentum (only scratch_cnn has); leave it at 0")
        arch_kw["bn_momentum"] = float(m.bn_momentum)
    # Runs saved before model.embedding_pool existed keep their backbone's default read-out
    # (the scratch CNN's Flatten), so their checkpoints export what they always did.
    pool = m.get("embedding_pool", None)
    if pool is not None and "embedding_pool" in accepted:
        arch_kw["embedding_pool"] = str(pool)
    elif pool not in (None, "avg", "avg2x2"):
        raise ConfigError(f"model.embedding_pool={pool!r}: model {m.name!r} always pools its "
                          "features (only scratch_cnn has a Flatten to read); leave it at the "
                          "default, avg2x2")
    seed = config.seed if seed is None else seed
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    return create_model(m.name, num_classes=num_classes, rngs=rngs, embed_dim=m.embed_dim,
                        l2_normalize=m.l2_normalize, head=m.head, dropout=m.dropout,
                        dtype=dtype, source=m.weights_source, **arch_kw)


def split_model(model: nnx.Module) -> tuple[Any, dict, dict, Any]:
    """(graphdef, params, batch_stats, other) with params and stats as pure dicts."""
    graphdef, params, stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats), nnx.to_pure_dict(other)


def create_train_state(config, model: nnx.Module, *, steps_per_epoch: int, total_steps: int,
                       lr_schedule: optax.Schedule | None = None
                       ) -> tuple[TrainState, ModelBundle, optax.GradientTransformation, Any]:
    """(state, bundle, tx, lr schedule) for `model` under config.train's policies.

    `lr_schedule` overrides the config's learning-rate schedule (used by the LR finder).
    """
    size, norm = resolve_input(config)
    dtype = compute_dtype(config.train.compute_dtype)
    remat = config.train.get("remat", "none")
    remat_policy(remat)  # a clear error for a bad name, before anything is traced
    graphdef, params, stats, other = split_model(model)

    def forward(p, s, x):
        return nnx.merge(graphdef, p, s, other)(x, train=False)

    x_spec = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    order = optim.layer_order(forward, params, stats, x_spec)
    labels = optim.param_labels(params, config.train, layer_order=order,
                                bn_layers=optim.bn_layer_paths(model))
    tx, schedule = optim.create_optimizer(config.train, labels, steps_per_epoch, total_steps,
                                          lr_schedule)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                       opt_state=tx.init(params))
    bundle = ModelBundle(graphdef=graphdef, other=other, input_size=size, normalization=norm,
                         compute_dtype=dtype, frozen=optim.frozen_mask(labels), labels=labels,
                         remat=remat)
    return state, bundle, tx, schedule
