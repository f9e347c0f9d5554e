"""Where a CPU forward pass spends its time: XLA's per-op trace vs torch's profiler, one run.

    PYTHONPATH=$PWD flock /work/cpu.lock .venv/bin/python bench/cpu_profile.py --model resnet18
    XLA_FLAGS=... .venv/bin/python bench/cpu_profile.py --model resnet50 --calls 2 --top 15

facejax: `jax.profiler.trace` of `--calls` forward calls after a warm-up, read back with
`jax.profiler.ProfileData`; every event on XLA's worker threads whose name is an HLO
instruction of the compiled module is one op execution. Per op: its output shape (from the
compiled HLO), time per call, share of the wall time, and on how many threads it ran. `busy
threads` is the sum of op time over wall time (how many cores the ops kept busy on average);
`cores (rusage)` is the process's user+sys CPU time over wall time.
torch (channels_last, inference_mode): `torch.profiler` self CPU time per op kind.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import machine, random_weights, torch_fn  # noqa: E402

from facejax.models import create_model  # noqa: E402

_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?\[[^\]]*\])")


def hlo_shapes(compiled_text: str) -> dict[str, str]:
    """{instruction name: output shape} of the entry and fused computations."""
    out = {}
    for line in compiled_text.splitlines():
        m = _DEF.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2))
    return out


def kind(name: str, text: str) -> str:
    """A coarse op kind: what the fused computation of `name` contains."""
    if name.startswith("ynn_fusion") or name.startswith("xnn_fusion"):
        body = re.search(rf"%?{re.escape(name)} = .*calls=%?([\w.\-]+)", text)
        comp = body.group(1) if body else ""
        block = re.search(rf"\n%?{re.escape(comp)} [^\n]*\{{(.*?)\n\}}", text, re.S)
        ops = block.group(1) if block else ""
        what = "conv" if "convolution(" in ops else "dot" if "dot(" in ops else "other"
        return f"{name.split('_')[0]} {what}"
    for key in ("convolution", "reduce-window", "dot", "reduce", "copy", "transpose"):
        if key in name:
            return key
    return "elementwise fusion" if "fusion" in name else "other"


def profile_facejax(name: str, x: np.ndarray, calls: int, dtype) -> dict:
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0),
                                                dtype=dtype))
    random_weights(model)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    xj = jnp.asarray(x)
    text = fwd.lower(state, xj).compile().as_text()
    shapes = hlo_shapes(text)
    fwd(state, xj).block_until_ready()
    d = tempfile.mkdtemp(prefix="cpu_profile_")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with jax.profiler.trace(d):
        for _ in range(calls):
            fwd(state, xj).block_until_ready()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cores = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall
    pb = sorted(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))[-1]
    data = jax.profiler.ProfileData.from_file(pb)
    per_op = collections.defaultdict(float)
    threads = collections.defaultdict(set)
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in shapes:
                    per_op[ev.name] += ev.duration_ns / 1e9
                    threads[ev.name].add(line.name)
    return dict(per_op=per_op, threads=threads, shapes=shapes, text=text, wall=wall / calls,
                cores=cores)


def profile_torch(tv_name: str, x: np.ndarray, calls: int) -> tuple[dict, float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    run = torch_fn(tv_name, x, channels_last=True)
    run()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
    wall = (time.perf_counter() - t0) / calls
    ops = {e.key: e.self_cpu_time_total / 1e6 / calls for e in prof.key_averages()}
    del torch
    return ops, wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3)).astype(np.float32)
    fj = profile_facejax(args.model, x, args.calls, jnp.dtype(args.dtype).type)
    total = sum(fj["per_op"].values()) / args.calls
    wall = fj["wall"]
    print(f"\n{args.model}, batch {args.batch}, 224 px, {args.dtype}; {machine()}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}\n")
    print(f"facejax: {wall * 1e3:.0f} ms per call ({args.batch / wall:.1f} images/s); op time "
          f"{total * 1e3:.0f} ms per call = {total / wall:.2f} busy threads; cores (rusage) "
          f"{fj['cores']:.2f}\n")
    by_kind = collections.defaultdict(float)
    for op, s in fj["per_op"].items():
        by_kind[kind(op, fj["text"])] += s / args.calls
    print("| facejax op kind | ms per call | share of op time |\n|---|---|---|")
    for k, s in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {s * 1e3:.1f} | {s / total:.0%} |")
    print("\n| top facejax ops | output | kind | ms per call | share of op time | threads |\n"
          "|---|---|---|---|---|---|")
    for op, s in sorted(fj["per_op"].items(), key=lambda kv: -kv[1])[:args.top]:
        s /= args.calls
        print(f"| {op} | {fj['shapes'][op]} | {kind(op, fj['text'])} | {s * 1e3:.1f} | "
              f"{s / total:.0%} | {len(fj['threads'][op])} |")
    if args.model in ("resnet18", "resnet50") and args.dtype == "float32":
        ops, twall = profile_torch(args.model, x, args.calls)
        ttotal = sum(ops.values())
        print(f"\ntorch channels_last: {twall * 1e3:.0f} ms per call "
              f"({args.batch / twall:.1f} images/s, under the profiler)\n")
        print("| torch op | self CPU ms per call | share |\n|---|---|---|")
        for k, s in sorted(ops.items(), key=lambda kv: -kv[1])[:8]:
            print(f"| {k} | {s * 1e3:.1f} | {s / ttotal:.0%} |")


if __name__ == "__main__":
    main()
