"""Depthwise convolution shared by MobileNet and EfficientNet-Lite (one implementation).

XLA:CPU runs `feature_group_count=C` convolutions 10-30x slower than the same conv written as
k*k strided multiply-adds (bench/depthwise.py), so `impl='auto'` picks the shifted form on CPU
and the grouped conv on accelerators, per platform when lowered (`lax.platform_dependent`), so a
multi-platform export carries both. Both give the same numbers (tests/test_zoo_models.py) and
the parameter is nnx.Conv's (`kernel`, (k, k, 1, C)), so converters and checkpoints see one tree.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError

DEPTHWISE_IMPLS = ("auto", "grouped", "shifted")


def check_impl(impl: str, model: str) -> str:
    """`impl` if it is a known implementation, else a ConfigError naming `model`."""
    if impl not in DEPTHWISE_IMPLS:
        raise ConfigError(f"{model} depthwise must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    return impl


def same_pads(n: int, k: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' (lo, hi) padding of one spatial axis: the odd pixel goes to the end."""
    total = max((-(-n // stride) - 1) * stride + k - n, 0)
    return total // 2, total - total // 2


def depthwise_shifted(x: jax.Array, w: jax.Array, stride: int, pads) -> jax.Array:
    """Depthwise conv, NHWC, kernel (k, k, 1, C), as k*k strided slices times per-channel
    weights: elementwise work that XLA fuses into one loop. On XLA:CPU this is 10-30x faster
    than `feature_group_count=C` (bench/depthwise.py) and gives the same numbers."""
    k = w.shape[0]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    oh = (xp.shape[1] - k) // stride + 1
    ow = (xp.shape[2] - k) // stride + 1
    acc = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(xp, (0, i, j, 0),
                                (xp.shape[0], i + (oh - 1) * stride + 1,
                                 j + (ow - 1) * stride + 1, xp.shape[3]),
                                (1, stride, stride, 1))
            acc = tap * w[i, j, 0] if acc is None else acc + tap * w[i, j, 0]
    return acc


class DepthwiseConv(nnx.Module):
    """kxk depthwise conv, no bias, with nnx.Conv's parameter (`kernel`, (k, k, 1, C)), so
    converters and checkpoints see the same tree. `same`: TF 'SAME' padding (else k//2 on every
    side, torch's). `impl`: 'grouped' (lax conv with feature_group_count), 'shifted'
    (`depthwise_shifted`) or 'auto' (shifted on CPU, grouped on accelerators). `kernel_init`
    defaults to nnx.Conv's, which draws the same numbers as an nnx.Conv of that shape."""

    def __init__(self, ch: int, k: int, stride: int, same: bool, impl: str, *, dtype,
                 rngs: nnx.Rngs, kernel_init: Callable | None = None):
        init = kernel_init or nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (k, k, 1, ch), jnp.float32))
        self.k, self.stride, self.same, self.dtype = k, stride, same, dtype
        self.impl = check_impl(impl, "depthwise conv")

    def __call__(self, x: jax.Array) -> jax.Array:
        x, w = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if self.same:
            pads = (same_pads(x.shape[1], self.k, self.stride),
                    same_pads(x.shape[2], self.k, self.stride))
        else:
            pads = ((self.k // 2, self.k // 2),) * 2

        def shifted(x, w):
            return depthwise_shifted(x, w, self.stride, pads)

        def grouped(x, w):
            return jax.lax.conv_general_dilated(x, w, (self.stride, self.stride), pads,
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                feature_group_count=x.shape[-1])

        if self.impl == "auto":
            # Chosen per platform when lowered, not by the backend that traced it: an embedder
            # exported on a GPU box (for cpu, cuda and tpu) runs the shifted form on a laptop.
            return jax.lax.platform_dependent(x, w, cpu=shifted, default=grouped)
        return shifted(x, w) if self.impl == "shifted" else grouped(x, w)
