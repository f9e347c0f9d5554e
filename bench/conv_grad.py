"""XLA:CPU convolution weight gradients, one layer alone: XLA's own vs one matmul per tap.

    PYTHONPATH=$PWD JAX_NUM_CPU_DEVICES=1 .venv/bin/python bench/conv_grad.py

Per layer shape (batch, size, C -> F, kernel, stride), milliseconds per call, median of 5
interleaved rounds: the forward conv, its input gradient, XLA's weight gradient, and the
weight gradient as K*K matmuls over strided slices of the padded input (what
facejax/models/conv.py does for 1x1 stride-1 layers, where there is no slice). 1x1 layers:
the matmul is 4-6x XLA's; k x k layers: 0.75-1.4x, and slower inside a whole train step (the
slices are copies), which is why only the 1x1 case is used. The step is what counts:
bench/train_throughput.py --also xla_conv. The second table: unpadded ('VALID') 3x3 layers as
XLA runs them vs the padded convolution cropped to the same window (models/conv.py).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SHAPES = [  # (batch, size, C, F, kernel, stride, pad)
    (32, 112, 3, 64, 7, 2, 3),     # ResNet stem at 224 px
    (32, 56, 64, 64, 3, 1, 1),     # ResNet18 stage 1
    (32, 56, 64, 128, 3, 2, 1),    # a stride-2 3x3
    (32, 28, 128, 128, 3, 1, 1),
    (32, 14, 256, 256, 3, 1, 1),
    (32, 7, 512, 512, 3, 1, 1),
    (32, 56, 64, 256, 1, 1, 0),    # bottleneck 1x1 (the case models/conv.py takes)
    (32, 56, 256, 128, 1, 2, 0),   # stride-2 1x1 downsample
    (32, 112, 3, 32, 3, 1, 1),     # scratch CNN block 1 at 112 px
    (32, 112, 32, 32, 3, 1, 0),
]


def bench(b, h, c, f, k, s, p, rounds=5):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, h, h, c)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((k, k, c, f)) * 0.05, jnp.float32)
    pad = ((p, p), (p, p))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (s, s), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    g = jnp.ones_like(conv(x, w))

    def taps(x, g):
        xp = jnp.pad(x, ((0, 0),) + pad + ((0, 0),))
        ho, wo = g.shape[1:3]
        return jnp.stack([jnp.stack([jnp.einsum("bhwc,bhwf->cf", lax.slice(
            xp, (0, i, j, 0), (b, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
            (1, s, s, 1)), g) for j in range(k)]) for i in range(k)])

    # Arguments, not closed-over constants: XLA would fold a constant computation away.
    jitted = {"fwd": jax.jit(lambda x, w, g: conv(x, w)),
              "dx": jax.jit(lambda x, w, g: jax.linear_transpose(lambda x_: conv(x_, w), x)(g)[0]),
              "dw_xla": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1]),
              "dw_taps": jax.jit(lambda x, w, g: taps(x, g))}
    fns = {name: (lambda f=f: f(x, w, g)) for name, f in jitted.items()}
    np.testing.assert_allclose(fns["dw_taps"](), fns["dw_xla"](), rtol=2e-3, atol=2e-2)
    for fn in fns.values():
        fn().block_until_ready()
    t = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn().block_until_ready()
            t[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in t.items()}
    print(f"| {b}x{h}x{h}x{c} -> {f}, {k}x{k} s{s} | {ms['fwd']:.1f} | {ms['dx']:.1f} | "
          f"{ms['dw_xla']:.1f} | {ms['dw_taps']:.1f} | {ms['dw_xla'] / ms['dw_taps']:.2f} |",
          flush=True)


VALID_SHAPES = [  # (batch, size, C, F): unpadded 3x3 stride-1 layers
    (32, 112, 32, 32),   # scratch CNN block 1 at 112 px
    (32, 55, 64, 64),    # scratch CNN block 2 at 112 px
    (32, 147, 32, 32),   # Inception v3 stem, Conv2d_2a_3x3
    (32, 73, 80, 192),   # Inception v3 stem, Conv2d_4a_3x3
]


def bench_valid(b, h, c, f, rounds=5):
    """An unpadded 3x3 conv as XLA runs it vs the padded one cropped (models/conv.py)."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, h, h, c)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, c, f)) * 0.05, jnp.float32)
    r = jnp.ones((b, h - 2, h - 2, f), jnp.float32)
    dn = ("NHWC", "HWIO", "NHWC")

    def valid(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)

    def cropped(x, w):
        y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
        return y[:, 1:-1, 1:-1, :]

    fns = {}
    for name, fn in (("valid", valid), ("cropped", cropped)):
        fwd = jax.jit(fn)
        both = jax.jit(lambda x, w, r, fn=fn: jax.grad(
            lambda x, w: jnp.sum(fn(x, w) * r), argnums=(0, 1))(x, w))
        fns[name] = lambda fwd=fwd: fwd(x, w)
        fns[name + "_bwd"] = lambda both=both: both(x, w, r)
    np.testing.assert_allclose(fns["cropped"](), fns["valid"](), rtol=1e-4, atol=1e-4)
    for fn in fns.values():
        jax.block_until_ready(fn())
    t = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            t[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in t.items()}
    print(f"| {b}x{h}x{h}x{c} -> {f} | {ms['valid']:.1f} | {ms['cropped']:.1f} | "
          f"{ms['valid'] / ms['cropped']:.2f} | {ms['valid_bwd']:.1f} | {ms['cropped_bwd']:.1f} | "
          f"{ms['valid_bwd'] / ms['cropped_bwd']:.2f} |", flush=True)


if __name__ == "__main__":
    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}\n")
    print("| layer | fwd ms | dx ms | dW XLA ms | dW taps ms | XLA / taps |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        bench(*shape)
    print("\n| unpadded 3x3 layer | fwd ms | padded + crop ms | ratio | fwd+bwd ms | "
          "padded + crop ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in VALID_SHAPES:
        bench_valid(*shape)
