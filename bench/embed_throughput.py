"""Embedding throughput, images/s: the exported artifact vs the in-process model vs a peer.

    .venv/bin/python bench/embed_throughput.py                       # CPU: resnet50, dlib_resnet
    .venv/bin/python bench/embed_throughput.py --models resnet18 --batch 64 --runs 3
    python bench/embed_throughput.py --batch 256 --dtype bfloat16    # on a GPU

What each column times, per call, host uint8 images in -> host float32 embeddings out (the
work `build_index.py` does per batch):
- `exported`: `load_embedder()` of a `jax.export` artifact written by `export_embedder` (the
  file build_index/search/eval load; no model code), called on one batch;
- `in-process`: `jax.jit` of the same embedding function over the live parameters (what a
  user who never exports would run);
- `embed_array`: the exported artifact's batched gallery loop (fixed-shape batches, last one
  padded) over `--gallery` images, as build_index runs it;
- the peer: torchvision (resnet18/50: same uint8 -> bilinear resize -> ImageNet
  normalise -> backbone -> global pool -> L2 normalise, channels_last, inference_mode, and
  bf16 autocast when --dtype bfloat16), or dlib-bin's own `compute_face_descriptor` for
  dlib_resnet (CPU only; 150 px chips, as dlib takes them).
One warm-up call per column (compilation), then `--runs` interleaved rounds; the median is
reported. Weights are random: throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forward import machine, random_weights, timed_interleaved  # noqa: E402

from facejax.models import create_model, get_preset  # noqa: E402
from facejax.retrieval.embed import export_embedder, load_embedder  # noqa: E402
from facejax.train.export import make_embed_fn  # noqa: E402

# facejax model -> (cache image side fed to the embedder, torchvision peer or 'dlib' or None)
MODELS = {
    "resnet18": (128, "resnet18"),
    "resnet50": (128, "resnet50"),
    "efficientnet_lite0": (128, None),
    "dlib_resnet": (150, "dlib"),
}
COLUMNS = ("exported", "in-process", "embed_array", "peer")


def facejax_columns(name: str, cache: int, x: np.ndarray, gallery: np.ndarray, dtype,
                    batch: int, tmp: str):
    """{column: no-arg call} for the exported artifact, the jitted model and embed_array."""
    model = nnx.eval_shape(lambda: create_model(name, num_classes=10, rngs=nnx.Rngs(0),
                                                dtype=dtype))
    random_weights(model)
    preset = get_preset(name)
    fn, params = make_embed_fn(model, preset.input_size, preset.normalization)
    meta = dict(model=name, cache_size=cache, resize_mode="resize",
                normalization=preset.normalization)
    t0 = time.perf_counter()
    export_embedder(fn, params, meta, os.path.join(tmp, name))
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = load_embedder(os.path.join(tmp, name))
    load_s = time.perf_counter() - t0

    live = jax.device_put(params)
    jitted = jax.jit(fn)
    want = np.asarray(jitted(live, x))
    got = emb(x)
    err = float(np.max(np.abs(got - want)))
    print(f"# {name}: export {export_s:.1f}s, load {load_s:.1f}s, exported vs in-process "
          f"max|diff| {err:.2e}", flush=True)
    return {
        "exported": lambda: emb(x),
        "in-process": lambda: np.asarray(jitted(live, x)),
        "embed_array": lambda: emb.embed_array(gallery, batch_size=batch, progress=False),
    }, dict(export_s=export_s, load_s=load_s, max_abs_diff=err)


def torch_peer(tv_name: str, x: np.ndarray, size: int, dtype: str):
    import torch
    import torch.nn.functional as F
    import torchvision

    dev = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    torch.backends.cudnn.benchmark = True
    model = getattr(torchvision.models, tv_name)(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(dev, memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    bf16 = dtype == "bfloat16"

    def run():
        with torch.inference_mode(), torch.autocast(dev, torch.bfloat16, enabled=bf16):
            t = torch.from_numpy(x).to(dev, non_blocking=False).permute(0, 3, 1, 2).float()
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=False)
            t = ((t - mean) / std).contiguous(memory_format=torch.channels_last)
            z = F.normalize(model(t).float().flatten(1), dim=1)
            return z.cpu().numpy()
    return run, f"torch {torch.__version__} ({dev}, {torch.get_num_threads()} threads)"


def dlib_peer(x: np.ndarray):
    import dlib

    spec = importlib.util.find_spec("face_recognition_models")  # never imported (pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("face_recognition_models is not installed (the [parity] extra)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / \
        "dlib_face_recognition_resnet_model_v1.dat"
    net = dlib.face_recognition_model_v1(str(path))
    chips = list(x)
    return (lambda: net.compute_face_descriptor(chips)), f"dlib-bin {dlib.__version__} (CPU)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet50", "dlib_resnet"], choices=MODELS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--gallery", type=int, default=0, help="embed_array images (0: 4 batches)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no_peer", action="store_true")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    gallery_n = args.gallery or 4 * args.batch

    results, peers = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            cache, peer = MODELS[name]
            rng = np.random.default_rng(0)
            x = rng.integers(0, 256, (args.batch, cache, cache, 3), dtype=np.uint8)
            gallery = rng.integers(0, 256, (gallery_n, cache, cache, 3), dtype=np.uint8)
            fns, info = facejax_columns(name, cache, x, gallery, dtype, args.batch, tmp)
            if peer and not args.no_peer:
                try:
                    if peer == "dlib":
                        fns["peer"], peers[name] = dlib_peer(x)
                    else:
                        fns["peer"], peers[name] = torch_peer(
                            peer, x, get_preset(name).input_size, args.dtype)
                except ImportError as e:
                    print(f"# {name}: no peer ({e})", flush=True)
            seconds = timed_interleaved(fns, args.runs)
            row = {c: (gallery_n if c == "embed_array" else args.batch) / s
                   for c, s in seconds.items()}
            results[name] = dict(images_per_s=row, **info)
            for c, v in row.items():
                print(f"# {name:20s} {c:12s} {v:9.1f} img/s", flush=True)

    dev = jax.devices()[0]
    where = dev.device_kind if dev.platform == "gpu" else machine()
    print(f"\nEmbedding throughput, images/s, uint8 host images in -> float32 host embeddings "
          f"out; batch {args.batch}, {args.dtype}, {where}; median of {args.runs} interleaved "
          f"rounds after a warm-up. {datetime.date.today()}; jax {jax.__version__}.\n")
    print("| model | exported | in-process | embed_array | peer | peer | exported / in-process "
          "| exported / peer |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for name, r in results.items():
        v = r["images_per_s"]
        cell = (lambda c: f"{v[c]:,.1f}" if c in v else "–")
        peer_ratio = f"{v['exported'] / v['peer']:.2f}" if "peer" in v else "–"
        print(f"| {name} | {cell('exported')} | {cell('in-process')} | {cell('embed_array')} | "
              f"{peers.get(name, '–')} | {cell('peer')} | "
              f"{v['exported'] / v['in-process']:.2f} | {peer_ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(batch=args.batch, dtype=args.dtype, runs=args.runs, device=where,
                           jax=jax.__version__, date=str(datetime.date.today()), peers=peers,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
