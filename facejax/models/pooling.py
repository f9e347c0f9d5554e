"""2x2 / stride-2 'VALID' max pooling with a cheap backward pass on XLA:CPU.

`nnx.max_pool` lowers to `reduce_window`, whose gradient is XLA's `select_and_scatter`: on
XLA:CPU that is a slow loop over every window: alone, forward + backward of the scratch CNN's
first pool (32x110x110x32) took 194 ms against 25 ms here (bench/train_profile.py). In the
whole train step it measured 1.14x (64 px) and 1.16x (112 px) the images/s with 2 host devices,
no change on one (BENCHMARKS.md, 2026-12-05). `max_pool_2x2` computes the
same values from the four strided views of the input, and routes the gradient like
`select_and_scatter` does: all of it to the first maximum of each window in row-major order
((0,0), (0,1), (1,0), (1,1)), so results, ties included, are unchanged (tests/test_pooling.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _views(x: jax.Array):
    """The four corners of every 2x2 window of `x [B,H,W,C]` (odd last row/col dropped)."""
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    x = x[:, :h, :w]
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """[B,H,W,C] -> [B,H//2,W//2,C]: `nnx.max_pool(x, (2, 2), (2, 2), 'VALID')`."""
    a, b, c, d = _views(x)
    return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _fwd(x):
    y = max_pool_2x2(x)
    return y, (x, y)


def _bwd(res, g):
    x, y = res
    a, b, c, d = _views(x)
    zero = jnp.zeros((), g.dtype)
    taken_a = a == y
    taken_b = (b == y) & ~taken_a
    taken_ab = taken_a | taken_b
    taken_c = (c == y) & ~taken_ab
    # The last corner takes what is left.
    taken_d = ~(taken_ab | taken_c)
    ga, gb, gc, gd = (jnp.where(t, g, zero) for t in (taken_a, taken_b, taken_c, taken_d))
    n, h2, w2, ch = g.shape
    top = jnp.stack([ga, gb], axis=3).reshape(n, h2, 2 * w2, ch)
    bottom = jnp.stack([gc, gd], axis=3).reshape(n, h2, 2 * w2, ch)
    dx = jnp.stack([top, bottom], axis=2).reshape(n, 2 * h2, 2 * w2, ch)
    pad_h, pad_w = x.shape[1] - 2 * h2, x.shape[2] - 2 * w2
    if pad_h or pad_w:
        dx = jnp.pad(dx, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return (dx,)


max_pool_2x2.defvjp(_fwd, _bwd)
