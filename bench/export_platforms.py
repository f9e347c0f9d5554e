"""A multi-platform embedder export (cpu, cuda, tpu, as retrieval/embed.py makes) called on this
CPU, traced as this CPU would trace it or as a GPU box would (`jax.default_backend` made to
report "gpu" while exporting): milliseconds per batch, median of 7 calls.

    PYTHONPATH=$PWD .venv/bin/python bench/export_platforms.py --model mobilenet_v2 --size 224

The CPU forms of models/conv.py and models/depthwise.py are picked per platform when lowered,
so both rows should match; before that choice, the "gpu" row ran XLA:CPU's grouped depthwise
convolutions (BENCHMARKS.md, "The CPU forms in a multi-platform export").
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facejax.models import create_model


def time_export(name: str, size: int, batch: int, traced_on: str) -> float:
    model = create_model(name, num_classes=3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def fn(s, x):
        return nnx.merge(graphdef, s).embed(x)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)),
                    jnp.float32)
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    real = jax.default_backend
    if traced_on != "cpu":
        jax.default_backend = lambda: traced_on
    try:
        exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda", "tpu"))(
            spec, jax.ShapeDtypeStruct(x.shape, x.dtype))
    finally:
        jax.default_backend = real
    call = jax.jit(exported.call)
    call(state, x).block_until_ready()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        call(state, x).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    for traced_on in ("cpu", "gpu"):
        ms = time_export(args.model, args.size, args.batch, traced_on)
        print(f"{args.model} {args.size}px batch {args.batch}, export traced on {traced_on}: "
              f"{ms:.1f} ms per batch")


if __name__ == "__main__":
    main()
