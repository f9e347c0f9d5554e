"""Optimisers, learning-rate schedules and fine-tuning policies (optax partitions) from config.

Fine-tuning policies label every parameter 'trainable', 'backbone' (trainable at
`backbone_lr_mult` x the LR) or 'frozen' (no update, no optimizer state):

- `all`: everything trains; the backbone at `backbone_lr_mult` x LR (discriminative LR).
- `frozen_backbone`: only the heads (embedding projection + classifier) train.
- `last_n`: the heads plus the last `trainable_last_n` *layers* of the backbone train. A layer
  is a submodule that owns parameters directly (a Conv, a BatchNorm, a Linear), ordered by
  where the forward pass first uses it (traced once with `jax.make_jaxpr`), so "last" means
  closest to the output whatever the attribute names. This is Keras' `layers[-n:]` with
  parameter-free layers (activations, pooling) not counted.
- `freeze_bn` (with any policy): BatchNorm scale/bias are frozen, and the step runs BatchNorm on
  its running statistics (see step.py).

Weight decay applies to parameters with ndim >= 2 (kernels) only: biases and norm scales are 1-D.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util
from jax.extend import core as jax_core

from facejax.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "step", "exponential", "cosine", "one_cycle")
FINETUNE = ("all", "frozen_backbone", "last_n")
# The EmbeddingModel attribute holding the backbone (facejax.models.heads), and the label of the
# backbone's own learning-rate group (train.backbone_lr_mult); labels key the optimizer state
# saved in checkpoints, so they keep their strings.
BACKBONE = "backbone"
FROZEN, TRAINABLE = "frozen", "trainable"

# fastai fit_one_cycle defaults: start at lr/25, peak after 25% of the steps, end at lr/1e5,
# with momentum (Adam's beta1) cycling 0.95 -> 0.85 -> 0.95.
ONE_CYCLE_PCT, ONE_CYCLE_DIV, ONE_CYCLE_DIV_FINAL = 0.25, 25.0, 1e5
ONE_CYCLE_MOMS = (0.95, 0.85, 0.95)


def make_schedule(t, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """The LR schedule (a function of the optimizer step) for `config.train` `t`."""
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
    if t.learning_rate <= 0:
        raise ConfigError(f"train.learning_rate must be > 0, got {t.learning_rate}")
    lr = float(t.learning_rate)
    spe = max(1, int(steps_per_epoch))
    if int(total_steps) <= 0:  # epochs=0: no step is taken, so warm-up and decay do not apply
        return optax.constant_schedule(lr)
    total = int(total_steps)
    if t.schedule == "one_cycle":
        return _cos_cycle(lr / ONE_CYCLE_DIV, lr, lr / ONE_CYCLE_DIV_FINAL, total)
    warmup = round(float(t.warmup_epochs) * spe)
    if not 0 <= warmup < total:
        raise ConfigError(f"train.warmup_epochs={t.warmup_epochs} must be >= 0 and shorter "
                          f"than the run ({total} steps)")
    if t.schedule in ("step", "exponential") and not 0 < t.decay_rate <= 1:
        raise ConfigError(f"train.decay_rate must be in (0, 1], got {t.decay_rate}")
    if t.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif t.schedule == "step":  # the paper's per-epoch decay: lr * rate ** epoch
        main = optax.exponential_decay(lr, spe, t.decay_rate, staircase=True)
    elif t.schedule == "exponential":
        main = optax.exponential_decay(lr, spe, t.decay_rate)
    else:
        main = optax.cosine_decay_schedule(lr, total - warmup)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _cos_cycle(start: float, peak: float, end: float, total: int) -> optax.Schedule:
    """fastai `combined_cos`: cosine start->peak over the first 25%, then peak->end."""
    up = max(1, int(ONE_CYCLE_PCT * total))
    down = max(1, total - up)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        a = jnp.clip(count / up, 0.0, 1.0)
        b = jnp.clip((count - up) / down, 0.0, 1.0)
        first = end_cos(start, peak, a)
        second = end_cos(peak, end, b)
        return jnp.where(count < up, first, second)

    return schedule


def end_cos(a, b, pct):
    """Cosine interpolation from a (pct=0) to b (pct=1)."""
    return b + (a - b) / 2.0 * (1.0 + jnp.cos(math.pi * pct))


def _momentum(t, total_steps: int) -> float | optax.Schedule:
    if t.schedule == "one_cycle":
        return _cos_cycle(*ONE_CYCLE_MOMS, max(1, int(total_steps)))
    return float(t.momentum) if t.optimizer == "sgd" else 0.9


def decay_mask(params) -> Any:
    """True for parameters that take weight decay (kernels, ndim >= 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def _group_tx(t, lr: optax.Schedule, momentum) -> optax.GradientTransformation:
    wd = float(t.weight_decay)
    if wd < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {wd}")
    scheduled = callable(momentum)
    parts = []
    if t.optimizer in ("adam", "sgd") and wd:  # classic L2, as Keras' kernel_regularizer
        parts.append(optax.add_decayed_weights(wd, decay_mask))
    if t.optimizer in ("adam", "adamw"):
        adam = optax.inject_hyperparams(optax.scale_by_adam) if scheduled else optax.scale_by_adam
        parts.append(adam(b1=momentum))
        if t.optimizer == "adamw" and wd:  # decoupled: added after Adam's scaling
            parts.append(optax.add_decayed_weights(wd, decay_mask))
    elif t.optimizer == "sgd":
        if scheduled:
            parts.append(optax.inject_hyperparams(optax.trace)(decay=momentum))
        elif momentum:
            parts.append(optax.trace(decay=momentum))
    else:
        raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, got {t.optimizer!r}")
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def create_optimizer(t, labels, steps_per_epoch: int, total_steps: int,
                     lr_schedule: optax.Schedule | None = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, lr schedule) for `config.train` `t` over parameters labelled by `param_labels`.

    `lr_schedule` replaces the config's schedule (the LR finder's exponential sweep).
    """
    if t.backbone_lr_mult < 0:
        raise ConfigError(f"train.backbone_lr_mult must be >= 0, got {t.backbone_lr_mult}")
    lr = lr_schedule or make_schedule(t, steps_per_epoch, total_steps)
    momentum = _momentum(t, total_steps)
    mult = float(t.backbone_lr_mult)
    transforms = {
        TRAINABLE: _group_tx(t, lr, momentum),
        BACKBONE: _group_tx(t, lambda c: mult * lr(c), momentum),
        FROZEN: optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, labels), lr


def param_labels(params, t, *, layer_order: list[tuple[str, ...]],
                 bn_layers: set[tuple[str, ...]]) -> dict:
    """Labels ('trainable' | 'backbone' | 'frozen') for a pure-dict parameter tree.

    `layer_order`: module paths owning parameters, in forward order (`layer_order()`).
    `bn_layers`: module paths of BatchNorm layers (frozen when `t.freeze_bn`).
    """
    if t.finetune not in FINETUNE:
        raise ConfigError(f"train.finetune must be one of {FINETUNE}, got {t.finetune!r}")
    flat = traverse_util.flatten_dict(params)
    backbone_layers = [p for p in layer_order if p[:1] == (BACKBONE,)]
    open_layers: set[tuple[str, ...]] | None = None
    if t.finetune == "last_n":
        n = int(t.trainable_last_n)
        if not 0 <= n <= len(backbone_layers):
            raise ConfigError(f"train.trainable_last_n must be in [0, {len(backbone_layers)}] "
                              f"(the backbone's parameterised layers), got {n}")
        open_layers = set(backbone_layers[len(backbone_layers) - n:])
    slow = BACKBONE if t.backbone_lr_mult != 1.0 else TRAINABLE
    if t.backbone_lr_mult == 0.0:
        slow = FROZEN
    labels = {}
    for path in flat:
        layer = path[:-1]
        if t.freeze_bn and layer in bn_layers:
            label = FROZEN
        elif path[:1] != (BACKBONE,):
            label = TRAINABLE
        elif t.finetune == "frozen_backbone" or (open_layers is not None
                                                  and layer not in open_layers):
            label = FROZEN
        else:
            label = slow
        labels[path] = label
    return traverse_util.unflatten_dict(labels)


def frozen_mask(labels) -> Any:
    return jax.tree.map(lambda lbl: lbl == FROZEN, labels)


def bn_layer_paths(model: nnx.Module) -> set[tuple[str, ...]]:
    """Module paths of the model's batch-norm layers (modules holding BatchStat variables)."""
    paths = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchStat):
            paths.add(tuple(str(p) for p in path[:-1]))
    return paths


def layer_order(fn: Callable, params, *args) -> list[tuple[str, ...]]:
    """Module paths owning parameters, ordered by first use in `fn(params, *args)`.

    Traces `fn` once (`jax.make_jaxpr`, nothing is compiled); `args` may be
    `jax.ShapeDtypeStruct`s. Layers the forward never uses go last, in name order.
    """
    flat = traverse_util.flatten_dict(params)
    paths = list(flat)
    leaves = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in flat.values()]

    def traced(leaf_values, *rest):
        p = traverse_util.unflatten_dict(dict(zip(paths, leaf_values)))
        return fn(p, *rest)

    closed = jax.make_jaxpr(traced)(leaves, *args)
    first: dict[int, int] = {}
    _first_uses(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[:len(paths)])},
                first, [0])
    order: dict[tuple[str, ...], int] = {}
    for i, path in enumerate(paths):
        pos = first.get(i, 1 << 60)
        order[path[:-1]] = min(order.get(path[:-1], pos), pos)
    return sorted(order, key=lambda layer: (order[layer], layer))


def _first_uses(jaxpr, tracked: dict, first: dict[int, int], counter: list[int]) -> None:
    """Records, per tracked input, the DFS position of the first equation reading it."""
    for eqn in jaxpr.eqns:
        sub = _inner_jaxpr(eqn)
        if sub is not None:
            inner = {sv: tracked[v] for v, sv in zip(eqn.invars, sub.invars)
                     if not isinstance(v, jax_core.Literal) and v in tracked}
            _first_uses(sub, inner, first, counter)
        else:
            for v in eqn.invars:
                if not isinstance(v, jax_core.Literal) and v in tracked:
                    first.setdefault(tracked[v], counter[0])
        counter[0] += 1


def _inner_jaxpr(eqn):
    """The body of a call-like equation (jit, custom_jvp/vjp, remat) whose inputs map 1:1."""
    for value in eqn.params.values():
        jaxpr = getattr(value, "jaxpr", value)
        if isinstance(jaxpr, jax_core.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
            return jaxpr
    return None
