"""Pure train/eval steps, and jitting them over a 1-D 'data' mesh (batch sharded, state replicated).

Batches are dicts: `image` uint8 [B,H,W,3] (the cache format; augmentation, resizing and
normalisation run inside the step, on the device), `label` int32 [B], and for eval `mask` bool
[B] (False on padding rows).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from facejax.data.augment import preprocess_eval, preprocess_train
from facejax.sharding import data_sharded, replicated
from facejax.train.losses import LossConfig, classification_loss
from facejax.train.state import ModelBundle, TrainState, remat_policy


def _reseed(model: nnx.Module, key: jax.Array) -> None:
    """Gives every rng stream (dropout) a key derived from the step key, so steps are pure."""
    streams = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)]
    for i, stream in enumerate(streams):
        stream.key.set_value(jax.random.fold_in(key, i))
        stream.count.set_value(jnp.zeros((), jnp.uint32))


def forward(model: nnx.Module, x: jax.Array, *, train: bool, backbone_train: bool) -> jax.Array:
    """Logits [B,C] (float32). `backbone_train=False` runs the backbone in inference mode
    (BatchNorm on running statistics: the freeze_bn policy) while the head still trains."""
    return model(x, train=train, backbone_train=backbone_train)


def train_step(state: TrainState, batch: dict, key: jax.Array, *, bundle: ModelBundle,
               tx: optax.GradientTransformation, loss_cfg: LossConfig, augment_cfg,
               freeze_bn: bool) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch; returns (new state, {'loss', 'accuracy'}).

    `key` is the run's key (raw uint32 key data); the step's randomness (augmentation, dropout)
    comes from folding in `state.step`, so a resumed run draws exactly what it would have.
    """
    aug_key, drop_key = jax.random.split(
        jax.random.fold_in(jax.random.wrap_key_data(key), state.step))
    x = preprocess_train(aug_key, batch["image"], augment_cfg, bundle.input_size,
                         bundle.normalization).astype(bundle.compute_dtype)
    labels = batch["label"]

    def loss_fn(params):
        model = bundle.merge(params, state.batch_stats)
        _reseed(model, drop_key)
        logits = forward(model, x, train=True, backbone_train=not freeze_bn)
        loss = classification_loss(logits, labels, loss_cfg).mean()
        stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return loss, (logits, stats)

    policy = remat_policy(bundle.remat)
    if policy is not None:
        loss_fn = jax.checkpoint(loss_fn, policy=policy)
    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # Frozen parameters are passed through untouched (not p + 0, which would turn -0.0 into 0.0).
    params = jax.tree.map(lambda p, u, f: p if f else (p + u).astype(p.dtype),
                          state.params, updates, bundle.frozen)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                              opt_state=opt_state)
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, batch: dict, *, bundle: ModelBundle, loss_cfg: LossConfig
              ) -> dict:
    """Sums over the unmasked rows of loss and correct predictions, their count, and the
    per-row embeddings [B,D] (float32) for retrieval metrics."""
    x = preprocess_eval(batch["image"], bundle.input_size, bundle.normalization)
    model = bundle.merge(state.params, state.batch_stats)
    logits, emb = model.logits_and_embedding(x.astype(bundle.compute_dtype), train=False)
    labels = batch["label"]
    mask = batch["mask"].astype(jnp.float32)
    loss = classification_loss(logits, jnp.maximum(labels, 0), loss_cfg)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask), "embedding": emb}


def jit_train_step(mesh: Mesh, **deps) -> Any:
    """`train_step` with its dependencies bound, jitted over `mesh` with the state donated."""
    repl, data = replicated(mesh), data_sharded(mesh)
    fn = functools.partial(train_step, **deps)
    return jax.jit(fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                   donate_argnums=0)


def jit_eval_step(mesh: Mesh, **deps) -> Any:
    """`eval_step` jitted over `mesh`; embeddings come back replicated (every host sees all)."""
    repl, data = replicated(mesh), data_sharded(mesh)
    fn = functools.partial(eval_step, **deps)
    return jax.jit(fn, in_shardings=(repl, data), out_shardings=repl)
