"""CPU inference options, one table: each variant (XLA flags, host devices, dtype, batch) in a
fresh process (XLA flags are read once per process), torch channels_last in every run.

    PYTHONPATH=$PWD flock /work/cpu.lock .venv/bin/python bench/cpu_options.py
    ... bench/cpu_options.py --models resnet18 resnet50 --variants baseline ynn host2 --runs 5
    ... bench/cpu_options.py --variants baseline --batches 1 8 32 64

Per variant and model, one child process times the facejax forward (`jax.jit` of the model
over its `nnx.split` state, as bench/forward.py) and torchvision in channels_last with
inference_mode (float32; for a bf16 variant also torch in bf16, `.to(bfloat16)`), interleaved,
median of `--runs` after a warm-up. `cores` is CPU time (user+sys, getrusage of the process)
over wall time during that column's timed calls: how many of the cores it kept busy. For a bf16
variant, `cosine` is the smallest cosine between bf16 and float32 outputs of the same random
weights and images, over 8 images and both the embedding (`model.embed`) and the logits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

YNN = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot"
# name -> (XLA flags, host devices, compute dtype)
VARIANTS = {
    "baseline": ("", 1, "float32"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", 1, "float32"),
    "xnn_fusion": ("--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", 1, "float32"),
    "xnn_graph": ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
                  1, "float32"),
    "ynn": (YNN, 1, "float32"),
    "onednn": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
               1, "float32"),
    "onednn_fusion": ("--xla_cpu_experimental_onednn_fusion_type=dot,eltwise", 1, "float32"),
    "concurrency_sched": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", 1, "float32"),
    "no_eigen_mt": ("--xla_cpu_multi_thread_eigen=false", 1, "float32"),
    "host2": ("", 2, "float32"),
    "host2_no_eigen_mt": ("--xla_cpu_multi_thread_eigen=false", 2, "float32"),
    "host2_ynn": (YNN, 2, "float32"),
    "bf16": ("", 1, "bfloat16"),
    "bf16_ynn": (YNN, 1, "bfloat16"),
    "bf16_onednn": ("--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
                    1, "bfloat16"),
}


class Timed:
    """A no-arg call that records wall time and process CPU time (all threads) per call."""

    def __init__(self, fn):
        self.fn, self.wall, self.cpu = fn, 0.0, 0.0

    def __call__(self):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        self.fn()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        self.wall += t1 - t0
        self.cpu += (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def child(spec: dict) -> dict:
    """Runs one variant in this (fresh) process; returns its figures."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from forward import random_weights, torch_fn

    from facejax.models import create_model
    from facejax.sharding import data_sharded, make_data_mesh, replicated

    name, batch, runs = spec["model"], spec["batch"], spec["runs"]
    dtype = jnp.dtype(spec["dtype"]).type
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)

    def build(dt):
        model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0),
                                                    dtype=dt))
        random_weights(model)
        return model

    model = build(dtype)
    graphdef, state = nnx.split(model)
    devices = jax.devices()
    if len(devices) > 1:  # padded to a multiple of the devices, as the Embedder does
        pad = -batch % len(devices)
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
        mesh = make_data_mesh(devices)
        rep, shard = replicated(mesh), data_sharded(mesh)
        state = jax.device_put(state, rep)
        xj = jax.device_put(x, shard)
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), in_shardings=(rep, shard),
                      out_shardings=shard)
    else:
        xj = jnp.asarray(x)
        fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    t0 = time.perf_counter()
    fwd(state, xj).block_until_ready()
    compile_s = time.perf_counter() - t0

    fns = {"facejax": Timed(lambda: fwd(state, xj).block_until_ready()),
           "torch_cl": Timed(torch_fn(name, x[:batch], channels_last=True))}
    if spec["dtype"] == "bfloat16":
        fns["torch_cl_bf16"] = Timed(torch_bf16_fn(name, x[:batch]))
    for f in fns.values():  # the warm-up is not counted in `cores`
        f.fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            w0 = f.wall
            f()
            times[k].append(f.wall - w0)
    out = dict(spec, devices=len(devices), compile_s=compile_s,
               ips={k: batch / statistics.median(v) for k, v in times.items()},
               cores={k: f.cpu / f.wall for k, f in fns.items()})
    if spec["dtype"] == "bfloat16":
        out["cosine"] = bf16_cosine(model, build(jnp.float32), x[:8])
    return out


def bf16_cosine(model_bf16, model_f32, x) -> float:
    import jax.numpy as jnp
    import numpy as np

    def cos(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
                     .min())

    xj = jnp.asarray(x)
    return min(cos(model_bf16.embed(xj, train=False), model_f32.embed(xj, train=False)),
               cos(model_bf16(xj), model_f32(xj)))


def torch_bf16_fn(tv_name: str, x):
    import numpy as np
    import torch
    import torchvision

    model = getattr(torchvision.models, tv_name)(weights=None).eval()
    model = model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(torch.bfloat16)
    xt = xt.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            model(xt)
    return run


def run_variant(variant: str, model: str, batch: int, runs: int, timeout: int) -> dict:
    flags, host, dtype = VARIANTS[variant]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in (env.get("XLA_FLAGS", ""), flags,
                    f"--xla_force_host_platform_device_count={host}" if host > 1 else "") if f)
    env["FACEJAX_CPU_PRESET"] = "0"  # the bare variant, whatever facejax would add
    spec = dict(variant=variant, model=model, batch=batch, runs=runs, dtype=dtype)
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                            json.dumps(spec)], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(spec, error=f"timed out after {timeout}s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return dict(spec, error=f"exit {p.returncode}: {tail[:160]}")
    return json.loads(lines[-1])


def row(r: dict) -> str:
    flags, host, _ = VARIANTS[r["variant"]]
    what = (flags.replace("--xla_cpu_", "") or "-") + (f", {host} host devices" if host > 1
                                                      else "")
    if "error" in r:
        return f"| {r['model']} | {r['variant']} | {r['batch']} | {what} | failed: {r['error']} |"
    ips, cores = r["ips"], r["cores"]
    fj, cl = ips["facejax"], ips["torch_cl"]
    bf = ips.get("torch_cl_bf16")
    extra = (f" | {bf:.1f} | {fj / bf:.2f} | {r['cosine']:.4f}" if bf else " | - | - | -")
    return (f"| {r['model']} | {r['variant']} | {r['batch']} | {what} | {fj:.1f} | {cl:.1f} | "
            f"**{fj / cl:.2f}** | {cores['facejax']:.2f} | {cores['torch_cl']:.2f}{extra} | "
            f"{r['compile_s']:.1f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batches", nargs="+", type=int, default=[32])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--timeout", type=int, default=600, help="seconds per child process")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    results = []
    for model in args.models:
        for batch in args.batches:
            for v in args.variants:
                r = run_variant(v, model, batch, args.runs, args.timeout)
                results.append(r)
                print("#", row(r), flush=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from forward import machine

    load = open("/proc/loadavg").read().split()[:3]
    print(f"\nCPU inference options, images/s, 224 px, median of {args.runs} interleaved rounds "
          f"after a warm-up; {machine()}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
          f"load average {' '.join(load)} at the end.\n")
    print("| model | variant | batch | flags | facejax | torch CL | facejax / torch CL | "
          "cores facejax | cores torch | torch CL bf16 | facejax / torch bf16 | cosine bf16 | "
          "compile s |")
    print("|---" * 13 + "|")
    for r in results:
        print(row(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
