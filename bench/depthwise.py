"""Depthwise convolution on XLA:CPU: one layer alone, against torch, and its share of MobileNetV2.

    .venv/bin/python bench/depthwise.py                  # batch 32, MobileNetV2's 17 dw shapes
    .venv/bin/python bench/depthwise.py --batch 8 --runs 3 --json out.json

For each depthwise layer shape of MobileNetV2 at 224 px (3x3, stride 1 or 2, Keras 'SAME'
padding) it times, interleaved (median of `--runs` after a warm-up):
- `xla grouped`: `lax.conv_general_dilated(feature_group_count=C)`, NHWC, as nnx.Conv runs it;
- `xla shifted`: the same conv written as k*k shifted multiply-adds (elementwise, fused by XLA);
- `torch NCHW` / `torch channels_last`: `nn.Conv2d(groups=C)` in inference mode.
Then the whole MobileNetV2 forward (facejax, same batch) with each implementation, so the summed
depthwise time is the depthwise share of the network. Outputs of `grouped` and `shifted` are
checked equal (1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import random_weights  # noqa: E402

from facejax.models import create_model  # noqa: E402
from facejax.models.mobilenet import plan_v2  # noqa: E402


def network_fn(x: np.ndarray, impl: str):
    """MobileNetV2 forward with its depthwise convs as `impl` ('grouped' or 'shifted')."""
    model = nnx.eval_shape(lambda: create_model("mobilenet_v2", num_classes=1000,
                                                rngs=nnx.Rngs(0), depthwise=impl))
    random_weights(model)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    xj = jnp.asarray(x)
    return lambda: fwd(state, xj).block_until_ready()


def shapes(size: int = 224) -> list[tuple[int, int, int]]:
    """(input side, channels, stride) of every MobileNetV2 depthwise conv."""
    _, plan, _ = plan_v2(1.0)
    side, out = size // 2, []
    for p in plan:
        out.append((side, p.mid, p.stride))
        side = -(-side // p.stride)
    return out


def grouped(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])


def shifted(x, w, stride):
    """Depthwise kxk conv, TF 'SAME', as k*k strided slices times per-channel weights."""
    k = w.shape[0]
    h = x.shape[1]
    out = -(-h // stride)
    total = max((out - 1) * stride + k - h, 0)
    lo = total // 2
    xp = jnp.pad(x, ((0, 0), (lo, total - lo), (lo, total - lo), (0, 0)))
    acc = None
    for i in range(k):
        for j in range(k):
            tap = xp[:, i:i + (out - 1) * stride + 1:stride, j:j + (out - 1) * stride + 1:stride]
            term = tap * w[i, j, 0]
            acc = term if acc is None else acc + term
    return acc


def timed(fns: dict, runs: int) -> dict[str, float]:
    for f in fns.values():
        f()
    t = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            s = time.perf_counter()
            f()
            t[k].append(time.perf_counter() - s)
    return {k: statistics.median(v) for k, v in t.items()}


def main(argv=None) -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    totals = {"xla grouped": 0.0, "xla shifted": 0.0, "torch NCHW": 0.0,
              "torch channels_last": 0.0}
    rows = []
    for side, c, stride in shapes():
        x = rng.standard_normal((args.batch, side, side, c)).astype(np.float32)
        w = rng.standard_normal((3, 3, 1, c)).astype(np.float32)
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        g = jax.jit(grouped, static_argnums=2)
        s = jax.jit(shifted, static_argnums=2)
        np.testing.assert_allclose(np.asarray(s(xj, wj, stride)), np.asarray(g(xj, wj, stride)),
                                   rtol=1e-4, atol=1e-4)
        conv = torch.nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False).eval()
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        conv_cl = torch.nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False).eval().to(
            memory_format=torch.channels_last)
        xt_cl = xt.contiguous(memory_format=torch.channels_last)

        def tch(m, t):
            with torch.inference_mode():
                m(t)
        sec = timed({"xla grouped": lambda: g(xj, wj, stride).block_until_ready(),
                     "xla shifted": lambda: s(xj, wj, stride).block_until_ready(),
                     "torch NCHW": lambda: tch(conv, xt),
                     "torch channels_last": lambda: tch(conv_cl, xt_cl)}, args.runs)
        for k, v in sec.items():
            totals[k] += v
        rows.append({"side": side, "channels": c, "stride": stride, **sec})
        print(f"# {side:4d}px {c:5d}ch s{stride} " + "  ".join(f"{k} {v * 1e3:7.2f} ms"
                                                            for k, v in sec.items()), flush=True)
    x = rng.standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    full = timed({impl: network_fn(x, impl) for impl in ("grouped", "shifted")}, args.runs)
    print(f"\nbatch {args.batch}, 17 depthwise layers of MobileNetV2 at 224 px, summed ms:")
    for k, v in totals.items():
        print(f"| {k} | {v * 1e3:.1f} ms | {v / totals['torch channels_last']:.2f}x torch CL |")
    for impl, sec in full.items():
        print(f"| MobileNetV2 forward, depthwise={impl} | {sec * 1e3:.1f} ms | "
              f"{args.batch / sec:.1f} img/s | depthwise share "
              f"{totals['xla ' + impl] / sec:.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "rows": rows, "totals_s": totals,
                       "mobilenet_v2_forward_s": full}, f, indent=1)


if __name__ == "__main__":
    main()
