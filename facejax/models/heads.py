"""Heads shared by every backbone: embedding projection, linear/cosine classifiers, the wrapper."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize (safe for all-zero rows)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


class EmbeddingHead(nnx.Module):
    """Optional Dense projection of pooled features; the L2 norm is applied by `embed()`."""

    def __init__(self, in_features: int, embed_dim: int, *, dtype: Any, rngs: nnx.Rngs):
        self.out_features = embed_dim or in_features
        self.proj = (nnx.Linear(in_features, embed_dim, dtype=dtype, rngs=rngs)
                     if embed_dim else None)

    def __call__(self, features: jax.Array) -> jax.Array:
        return features if self.proj is None else self.proj(features)


class CosineHead(nnx.Module):
    """Cosine similarity to L2-normalised class weights, for ArcFace/CosFace margins in the loss.

    Returns cosines in [-1, 1]; the margin and scale belong to the loss, not to the model.
    """

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (in_features, num_classes), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = l2_normalize(x.astype(jnp.float32), axis=-1)
        w = l2_normalize(self.kernel[...], axis=0)
        return x @ w


class EmbeddingModel(nnx.Module):
    """Backbone + embedding head + classification head (`head`).

    `features` are the backbone's pooled features; `embed` is the (projected, optionally
    L2-normalised) embedding; `__call__` gives logits from the un-normalised embedding (after
    dropout). Outputs are float32 whatever the compute dtype.
    """

    def __init__(self, backbone: nnx.Module, *, num_classes: int, embed_dim: int = 0,
                 l2_normalize: bool = True, head: str = "linear", dropout: float = 0.0,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.backbone = backbone
        self.embedding = EmbeddingHead(backbone.num_features, embed_dim, dtype=dtype, rngs=rngs)
        self.l2_normalize = l2_normalize
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        dim = self.embedding.out_features
        if head == "cosine":
            self.head = CosineHead(dim, num_classes, rngs=rngs)
        else:
            self.head = nnx.Linear(dim, num_classes, dtype=dtype, rngs=rngs)
        self.num_classes = num_classes
        # The retrieval embedding's width: the classifier's input, unless the backbone reads
        # out something else without a projection (the scratch CNN's pooled Flatten).
        self.embed_dim = dim if embed_dim else getattr(backbone, "embed_features", dim)

    def features(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] normalised images -> [B,F] pooled backbone features (float32)."""
        return self.backbone(x, train=train).astype(jnp.float32)

    def _retrieval(self, z: jax.Array) -> jax.Array:
        """The classifier's input `z` -> the retrieval embedding (before the L2 norm): `z`,
        or without a projection the backbone's own read-out when it has one."""
        pick = getattr(self.backbone, "retrieval_features", None)
        return pick(z) if pick is not None and self.embedding.proj is None else z

    def describe_embedding(self) -> str:
        """What `embed` returns, in words: what an index of this model stores."""
        if self.embedding.proj is not None:
            what = f"a learnt projection of the backbone's features ({self.embed_dim}-d)"
        elif hasattr(self.backbone, "describe_embedding"):
            what = self.backbone.describe_embedding()
        else:
            what = f"the backbone's pooled features ({self.embed_dim}-d)"
        return what + (", L2-normalised" if self.l2_normalize else "")

    def embed(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[B,H,W,3] -> [B,D] embedding (float32, unit-norm when l2_normalize)."""
        z = self._retrieval(self.embedding(self.backbone(x, train=train))).astype(jnp.float32)
        return l2_normalize(z) if self.l2_normalize else z

    def __call__(self, x: jax.Array, train: bool = False,
                 backbone_train: bool | None = None) -> jax.Array:
        """[B,H,W,3] -> [B,C] logits (cosines for head='cosine'), float32. `backbone_train`
        (default: `train`) runs the backbone alone in inference mode (False: BatchNorm on its
        running statistics, the freeze_bn policy) while the heads train."""
        z = self.embedding(self.backbone(x, train=train if backbone_train is None
                                         else backbone_train))
        if self.dropout is not None:
            z = self.dropout(z, deterministic=not train)
        return self.head(z).astype(jnp.float32)

    def logits_and_embedding(self, x: jax.Array, train: bool = False):
        """One backbone pass giving both (logits [B,C], embedding [B,D]); for training losses."""
        z = self.embedding(self.backbone(x, train=train))
        emb = self._retrieval(z).astype(jnp.float32)
        emb = l2_normalize(emb) if self.l2_normalize else emb
        if self.dropout is not None:
            z = self.dropout(z, deterministic=not train)
        return self.head(z).astype(jnp.float32), emb
