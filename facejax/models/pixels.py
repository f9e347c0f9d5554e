"""Raw pixels as the embedding: the no-learning baseline of the quality report."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.models.registry import ModelSpec, Preset


class RawPixels(nnx.Module):
    """Features = the image, resized to `side` px and centred per image, flattened.

    No parameters: retrieval on these features is what any learned embedding must beat.
    Per-image mean removal makes the cosine similarity a correlation of intensities, so a
    brighter photo of the same scene still matches.
    """

    def __init__(self, *, rngs: nnx.Rngs, dtype: Any = jnp.float32, side: int = 32):
        del rngs
        self.side = int(side)
        self.dtype = dtype
        self.num_features = self.side * self.side * 3

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B, side*side*3]."""
        del train
        x = jax.image.resize(x.astype(jnp.float32), (x.shape[0], self.side, self.side, 3),
                             "bilinear", antialias=True)
        x = x.reshape(x.shape[0], -1)
        return (x - x.mean(axis=1, keepdims=True)).astype(self.dtype)


MODELS = {
    "raw_pixels": ModelSpec(
        backbone=RawPixels,
        presets={"none": Preset(input_size=32, normalization="unit")},
        arch_kw={"side": 32},
        description="baseline: 32x32 RGB pixels, centred per image (no parameters)",
    ),
}
