"""Forward (inference) throughput, images/s: facejax vs torchvision vs Keras-on-JAX, one run.

    KERAS_BACKEND=jax .venv/bin/python bench/forward.py            # batch 32, 224 px, 5 runs
    .venv/bin/python bench/forward.py --models resnet18 --runs 3 --json out.json
    .venv/bin/python bench/forward.py --models efficientnet_lite0 resnet50v2 \
        --frameworks facejax "facejax dw=grouped"    # depthwise as shifted adds vs grouped conv

Every framework gets a warm-up call (compilation, allocator); then `--runs` rounds each time
one call per framework, interleaved so that load from other processes on a shared machine hits
all columns alike; the median per framework is reported. facejax: `jax.jit` of a pure function
over the `nnx.split` state (as the trainer/exporter use it); torchvision: eval + inference_mode,
NCHW and channels_last; Keras 3 (JAX backend): `predict_on_batch` (its jitted predict step).
The opt-in column `facejax dw=grouped` runs models with depthwise convs (MobileNet,
EfficientNet-Lite) with XLA's grouped conv instead of the CPU default (shifted multiply-adds).
Weights are random (throughput does not depend on their values).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facejax.convert.merge import assign_weights, flatten, model_weights, unflatten
from facejax.models import create_model

# facejax name -> (torchvision constructor or None, keras.applications name or None, or
# (name, keyword arguments))
PEERS = {
    "resnet18": ("resnet18", None),
    "resnet50": ("resnet50", "ResNet50"),
    "resnet50v2": (None, "ResNet50V2"),
    "vgg16": ("vgg16", "VGG16"),
    "efficientnet_lite0": (None, None),  # neither ships Lite (keras/torchvision B0 has SE)
    "mobilenet_v2": ("mobilenet_v2", "MobileNetV2"),
    "mobilenet_v2_035": (None, ("MobileNetV2", {"alpha": 0.35})),  # torchvision has no 0.35
    "mobilenet_v3_small": ("mobilenet_v3_small", "MobileNetV3Small"),
    "mobilenet_v3_large": ("mobilenet_v3_large", "MobileNetV3Large"),
    "densenet121": ("densenet121", "DenseNet121"),
    "densenet169": ("densenet169", "DenseNet169"),
    "inception_v3": ("inception_v3", "InceptionV3"),
}
COLUMNS = ("facejax", "torch NCHW", "torch channels_last", "keras-jax")
GROUPED = "facejax dw=grouped"  # opt-in: depthwise convs as XLA's grouped conv
DEPTHWISE = ("mobilenet", "efficientnet_lite")  # the families with a `depthwise` argument


def timed_interleaved(fns: dict, runs: int) -> dict[str, float]:
    """Median seconds per call of each fn: one warm-up each, then `runs` interleaved rounds."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def random_weights(model: nnx.Module, seed: int = 0) -> None:
    """Fills an abstract model with random numpy weights (skips the slow initialisers)."""
    rng = np.random.default_rng(seed)
    tree = {}
    for path, v in flatten(model_weights(model)).items():
        if path.endswith("/var"):
            tree[path] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
        else:
            fan_in = int(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 1
            tree[path] = (rng.standard_normal(v.shape) / np.sqrt(fan_in)).astype(np.float32)
    assign_weights(model, unflatten(tree))


def facejax_fn(name: str, x: np.ndarray, **arch_kw):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0),
                                                **arch_kw))
    random_weights(model)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    xj = jnp.asarray(x)
    return lambda: fwd(state, xj).block_until_ready()


def torch_fn(tv_name: str, x: np.ndarray, channels_last: bool):
    import torch
    import torchvision

    model = getattr(torchvision.models, tv_name)(weights=None).eval()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            model(xt)
    return run


def keras_fn(keras_name, x: np.ndarray):
    import keras

    keras_name, kw = keras_name if isinstance(keras_name, tuple) else (keras_name, {})
    model = getattr(keras.applications, keras_name)(weights=None,
                                                     input_shape=x.shape[1:], **kw)
    return lambda: model.predict_on_batch(x)


def make_fn(column: str, name: str, x: np.ndarray):
    """A no-argument forward call of `name` in one framework column (None: no such peer)."""
    tv, ka = PEERS[name]
    if column == "facejax":
        return facejax_fn(name, x)
    if column == GROUPED:
        return facejax_fn(name, x, depthwise="grouped") if name.startswith(DEPTHWISE) else None
    if column.startswith("torch"):
        return torch_fn(tv, x, column.endswith("channels_last")) if tv else None
    return keras_fn(ka, x) if ka else None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(PEERS), choices=list(PEERS))
    p.add_argument("--frameworks", nargs="+", default=list(COLUMNS),
                   choices=list(COLUMNS) + [GROUPED])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)

    x = np.random.default_rng(0).standard_normal(
        (args.batch, args.size, args.size, 3)).astype(np.float32)
    results: dict[str, dict[str, float | None]] = {}
    for name in args.models:
        fns = {c: make_fn(c, name, x) for c in args.frameworks}
        seconds = timed_interleaved({c: f for c, f in fns.items() if f is not None}, args.runs)
        results[name] = {c: (args.batch / seconds[c] if c in seconds else None)
                         for c in args.frameworks}
        for c, v in results[name].items():
            print(f"# {name:20s} {c:20s} " + ("n/a" if v is None else f"{v:.1f} img/s"),
                  flush=True)
        del fns  # free this model's weights before the next

    import torch
    print(f"\nForward throughput, images/s (median of {args.runs} interleaved rounds after a "
          f"warm-up), batch "
          f"{args.batch}, {args.size}x{args.size}, float32, CPU: {machine()}. "
          f"{datetime.date.today()}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads).\n")
    cols = [c for c in COLUMNS + (GROUPED,) if c in args.frameworks]
    ratio_cols = [c for c in cols if c != "facejax"]
    print("| model | " + " | ".join(cols) + " | " +
          " | ".join(f"facejax / {c}" for c in ratio_cols) + " |")
    print("|---" * (1 + len(cols) + len(ratio_cols)) + "|")
    for name, row in results.items():
        cells = ["-" if row.get(c) is None else f"{row[c]:.1f}" for c in cols]
        fj = row.get("facejax")
        ratios = ["-" if fj is None or row.get(c) is None else f"{fj / row[c]:.2f}"
                  for c in ratio_cols]
        print(f"| {name} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "size": args.size, "runs": args.runs,
                       "machine": machine(), "images_per_s": results}, f, indent=1)


if __name__ == "__main__":
    main()
