"""The paper's scratch CNN (Table 1): three conv/BN/conv/max-pool blocks, then Flatten."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models.pooling import max_pool_2x2
from facejax.models.registry import ModelSpec, Preset

# Retrieval read-outs: the last block's map averaged over a 2x2 grid of regions (avg2x2) or
# over all of it (avg), or its Flatten (Table 1). Measured on AT&T faces at 64 px, one trained
# model read three ways: Flatten 4,608-d mAP@R 0.646, avg2x2 512-d 0.613, avg 128-d 0.485.
EMBEDDING_POOLS = ("avg2x2", "avg", "flatten")

# Keras' BatchNormalization default is 0.99, which the seed used. Its running statistics (what
# evaluation normalises with) then average over ~100 steps, so a short run evaluates with
# stale ones: on a 3,000-image Fashion-MNIST epoch (37 steps of 64) validation accuracy was
# 0.21 with 0.99 against 0.68 with 0.9 (mean of 3 seeds; training itself is unchanged).
BN_MOMENTUM = 0.9


class ScratchCNN(nnx.Module):
    """Table 1 of the paper, for a square `input_size` RGB input.

    Each block is Conv3x3 'same' (ReLU) -> BatchNorm -> Conv3x3 'valid' (ReLU) -> MaxPool 2x2.
    The order follows the paper's Keras model, where the ReLU lives inside `Conv2D(activation=
    'relu')` and BatchNormalization comes after it; BN uses Keras' epsilon 1e-3, and momentum
    `bn_momentum` (default `BN_MOMENTUM` = 0.9; pass 0.99 for Keras' exact default). Features
    are the Flatten, so `num_features` depends on `input_size` (128 -> 14*14*128 = 25088);
    the Dropout and Dense(num_classes) of Table 1 are the shared head's (`EmbeddingModel`).

    `embedding_pool` is the retrieval read-out (what `EmbeddingModel.embed` returns, and so
    what an index stores, when there is no projection): 'flatten' is that Flatten (Table 1's
    own layer, 25,088-d at 128 px); 'avg2x2' averages it over each quarter of the last block's
    positions (4 x 128 = 512-d at any input size; 128-d when the map is 1x1); 'avg' over all of
    them (128-d). The classifier reads the Flatten in every case, so the trained layers and
    their parameters are Table 1's.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, input_size: int = 128,
                 filters: Sequence[int] = (32, 64, 128), bn_momentum: float = BN_MOMENTUM,
                 embedding_pool: str = "flatten"):
        if not 0.0 <= float(bn_momentum) < 1.0:
            raise ConfigError(f"scratch_cnn: bn_momentum must be in [0, 1), got {bn_momentum}")
        if embedding_pool not in EMBEDDING_POOLS:
            raise ConfigError(f"model.embedding_pool must be one of {EMBEDDING_POOLS}, got "
                              f"{embedding_pool!r}")
        side = int(input_size)
        for _ in filters:
            side = (side - 2) // 2  # 'valid' 3x3 conv, then 2x2 pool (floor, as Keras)
            if side < 1:
                raise ConfigError(
                    f"scratch_cnn: input_size {input_size} is too small for {len(filters)} "
                    f"conv/pool blocks (needs >= {_min_size(len(filters))})")
        self.input_size = int(input_size)
        self.num_blocks = len(filters)
        self.num_features = side * side * int(filters[-1])
        self.channels = int(filters[-1])
        self.embedding_pool = embedding_pool
        self.side = side
        self.grid = {"avg2x2": min(2, side), "avg": 1}.get(embedding_pool, 0)
        self.embed_features = (self.grid ** 2 * self.channels if self.grid
                               else self.num_features)
        cin = 3
        for i, f in enumerate(filters, start=1):
            conv = {"kernel_size": (3, 3), "dtype": dtype, "rngs": rngs}
            setattr(self, f"block{i}_conv1", nnx.Conv(cin, f, padding="SAME", **conv))
            setattr(self, f"block{i}_bn", nnx.BatchNorm(
                f, momentum=float(bn_momentum), epsilon=1e-3, dtype=dtype, rngs=rngs))
            setattr(self, f"block{i}_conv2", nnx.Conv(f, f, padding="VALID", **conv))
            cin = f

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,S,S,3] -> [B, num_features] (the Flatten of the last block)."""
        if x.shape[1:3] != (self.input_size, self.input_size):
            raise ConfigError(
                f"scratch_cnn was built for {self.input_size}px inputs (its Dense layer size "
                f"depends on it), got {x.shape[1]}x{x.shape[2]}")
        for i in range(1, self.num_blocks + 1):
            x = jax.nn.relu(getattr(self, f"block{i}_conv1")(x))
            x = getattr(self, f"block{i}_bn")(x, use_running_average=not train)
            x = jax.nn.relu(getattr(self, f"block{i}_conv2")(x))
            # nnx.max_pool's values and gradients, without XLA:CPU's slow select_and_scatter.
            x = max_pool_2x2(x)
        return x.reshape(x.shape[0], -1)

    def retrieval_features(self, flat: jax.Array) -> jax.Array:
        """[B, num_features] Flatten -> [B, embed_features] (`embedding_pool`)."""
        if not self.grid:
            return flat
        x = flat.reshape(flat.shape[0], self.side, self.side, self.channels)
        edges = [round(i * self.side / self.grid) for i in range(self.grid + 1)]
        cells = [x[:, edges[i]:edges[i + 1], edges[j]:edges[j + 1]].mean(axis=(1, 2))
                 for i in range(self.grid) for j in range(self.grid)]
        return jnp.concatenate(cells, axis=-1)

    def describe_embedding(self) -> str:
        """What the retrieval read-out is, in words (recorded with an exported embedder)."""
        side, g = self.side, self.grid
        if g == 1:
            return (f"the last conv block's {self.channels} channels averaged over its "
                    f"{side}x{side} positions ({self.embed_features}-d)")
        if g:
            return (f"the last conv block's {self.channels} channels averaged over each cell of "
                    f"a {g}x{g} grid on its {side}x{side} positions ({self.embed_features}-d)")
        return (f"the Flatten of the last conv block ({side}x{side}x{self.channels} = "
                f"{self.num_features}-d)")


def _min_size(blocks: int) -> int:
    side = 1
    for _ in range(blocks):
        side = side * 2 + 2
    return side


MODELS = {
    "scratch_cnn": ModelSpec(
        backbone=ScratchCNN,
        # The seed trains from scratch on 128px images rescaled to [0, 1].
        presets={"scratch": Preset(input_size=128, normalization="unit")},
        arch_kw={"input_size": 128},
        description="seed Table 1 CNN (3 conv blocks, Flatten features); no pretrained weights",
    ),
}
