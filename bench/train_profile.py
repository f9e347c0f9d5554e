"""Where a CPU train step's time goes: augmentation alone vs the whole step, and per layer.

  PYTHONPATH=$PWD .venv/bin/python bench/train_profile.py --model scratch_cnn --sizes 64 112
  PYTHONPATH=$PWD .venv/bin/python bench/train_profile.py --model resnet18 --sizes 112 224 \
      --no-layers

For each size: facejax's on-device augmentation (random affine + flip + normalise, jitted on its
own) per batch against the whole jitted train step (bench/train_throughput.py's), and for the
scratch CNN each layer's forward + backward on its own at its own shape (convolutions, BatchNorm,
ReLU, max pooling both ways: flax's reduce_window and facejax.models.pooling.max_pool_2x2, and
the Flatten -> Dense head), as milliseconds and as a share of their sum. Medians of --runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.train_throughput import CLASSES, _config, jax_stepper  # noqa: E402
from facejax import cli  # noqa: E402


def _ms(fn, runs: int) -> float:
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def augment_vs_step(model: str, size: int, batch: int, runs: int) -> dict:
    import jax

    from facejax.data.augment import preprocess_train
    from facejax.train.state import resolve_input

    cfg = _config(model, size, batch)
    _, preset = resolve_input(cfg)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    images = jax.device_put(images)
    aug = jax.jit(lambda k, x: preprocess_train(k, x, cfg.augment, size, preset))
    key = jax.random.key(0)
    step = jax_stepper(model, size, batch)
    aug_ms = _ms(lambda: aug(key, images), runs)
    step_ms = _ms(lambda: step() or 0, runs)
    return dict(augment_ms=aug_ms, step_ms=step_ms, share=aug_ms / step_ms)


def scratch_layers(size: int, batch: int, runs: int, filters=(32, 64, 128)) -> list:
    """Forward + backward of each scratch CNN layer alone, at the shape it sees in training."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from facejax.models.pooling import max_pool_2x2

    def conv(cin, cout, pad):
        w = jnp.full((3, 3, cin, cout), 0.01, jnp.float32)
        return w, lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(x, w):
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-3) * w

    def time_grad(name, f, x, w, wrt_x=True):
        argnums = (0, 1) if wrt_x else 1
        g = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=argnums))
        rows.append((name, tuple(x.shape), _ms(lambda: g(x, w), runs)))

    rows, side, cin = [], size, 3
    rng = np.random.default_rng(0)
    for i, f in enumerate(filters, start=1):
        x = jnp.asarray(rng.normal(size=(batch, side, side, cin)).astype(np.float32))
        w, fn = conv(cin, f, "SAME")
        time_grad(f"block{i} conv1 3x3 SAME {cin}->{f}", fn, x, w, wrt_x=i > 1)
        y = jnp.asarray(rng.normal(size=(batch, side, side, f)).astype(np.float32))
        time_grad(f"block{i} relu", lambda x, w: jax.nn.relu(x) * w, y, jnp.float32(1))
        time_grad(f"block{i} batchnorm (train)", bn, y, jnp.ones((f,), jnp.float32))
        w, fn = conv(f, f, "VALID")
        time_grad(f"block{i} conv2 3x3 VALID {f}->{f}", fn, y, w)
        side -= 2
        y = jnp.asarray(rng.normal(size=(batch, side, side, f)).astype(np.float32))
        time_grad(f"block{i} relu", lambda x, w: jax.nn.relu(x) * w, y, jnp.float32(1))
        time_grad(f"block{i} max_pool (flax reduce_window)", lambda x, w: nnx.max_pool(
            x, (2, 2), (2, 2), "VALID") * w, y, jnp.float32(1))
        time_grad(f"block{i} max_pool (max_pool_2x2)", lambda x, w: max_pool_2x2(x) * w, y,
                  jnp.float32(1))
        side, cin = side // 2, f
    x = jnp.asarray(rng.normal(size=(batch, side * side * cin)).astype(np.float32))
    w = jnp.full((side * side * cin, CLASSES), 0.01, jnp.float32)
    time_grad(f"head Flatten {side}x{side}x{cin} -> Dense {CLASSES}", lambda x, w: x @ w, x, w)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="scratch_cnn")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    args = parser.parse_args(argv)
    import jax
    print(f"jax {jax.__version__}, {jax.device_count()} device(s), load "
          f"{os.getloadavg()[0]:.1f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    print("\n| model | px | batch | augment ms/batch | train step ms | augment share |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        r = augment_vs_step(args.model, size, args.batch, args.runs)
        print(f"| {args.model} | {size} | {args.batch} | {r['augment_ms']:.1f} | "
              f"{r['step_ms']:.1f} | {r['share']:.0%} |", flush=True)
    if args.model == "scratch_cnn" and not args.no_layers:
        for size in args.sizes:
            rows = scratch_layers(size, args.batch, args.runs)
            # The sum counts one of the two pooling rows per block: the one the model uses.
            total = sum(ms for name, _, ms in rows if "reduce_window" not in name)
            print(f"\n{size} px, batch {args.batch}: forward + backward per layer "
                  f"(share of the sum with max_pool_2x2; load {os.getloadavg()[0]:.1f})")
            print("| layer | input | ms | share |")
            print("|---|---|---|---|")
            for name, shape, ms in rows:
                print(f"| {name} | {'x'.join(map(str, shape))} | {ms:.1f} | {ms / total:.0%} |")
    return 0


if __name__ == "__main__":
    cli.run(main)
