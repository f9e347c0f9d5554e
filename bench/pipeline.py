"""Input-pipeline throughput: uint8 cache -> augmented, normalized device batch, vs PyTorch.

  .venv/bin/python bench/pipeline.py                      # LFW-aligned if present, else synthetic
  .venv/bin/python bench/pipeline.py --images-npy cache.npy --sizes 224 --seconds 10

Rows, per image size:
  grain host only      TrainIterator -> numpy batches (what a GPU's host side must keep up with)
  grain + augment      TrainIterator -> to_global -> jitted preprocess_train, here on the CPU
  torch DataLoader     JPEG files -> PIL decode -> RandomAffine + flip -> normalized tensors
'vs torch' is images/s over the torch loader's on the same files in the same run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from facejax import cli
from facejax.errors import DataError

LFW = "/work/shared/data/faces/lfw_aligned"
BATCH = 128
# Matches configs/common.py augment defaults, so both loaders do the same work.
DEGREES, TRANSLATE, ZOOM = 10.0, 0.05, 0.1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jpeg_paths(root: str, n: int) -> list[str]:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith((".jpg", ".jpeg")))
    return paths[:n]


def _cache(paths: list[str], size: int, n: int, npy: str | None, out_dir: str) -> np.ndarray:
    """A memory-mapped uint8 [N,size,size,3] cache, as prepare_data would hand the trainer."""
    if npy:
        images = np.load(npy, mmap_mode="r")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise DataError(f"{npy}: expected uint8 [N,S,S,3], got {images.dtype} {images.shape}")
        return images
    if paths:
        from facejax.data.decode import decode_image
        images = np.stack([decode_image(p, size) for p in paths])
    else:
        tile = np.random.default_rng(0).integers(0, 256, (64, size, size, 3), dtype=np.uint8)
        images = np.resize(tile, (n, size, size, 3))
    path = os.path.join(out_dir, f"cache_{size}.npy")
    np.save(path, images)
    return np.load(path, mmap_mode="r")


def _rate(step, seconds: float, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * BATCH / (time.perf_counter() - t0)


def bench_grain(images: np.ndarray, size: int, workers: int, seconds: float,
                augment: bool) -> float:
    import jax

    from facejax.data import augment as aug
    from facejax import sharding
    from facejax.data import pipeline

    cfg = _augment_config()
    labels = np.zeros(len(images), np.int32)
    it = pipeline.TrainIterator(images, np.arange(len(images)), labels, batch_size=BATCH, seed=0,
                                workers=workers)
    try:
        if not augment:
            return _rate(lambda: next(it), seconds)
        mesh = sharding.make_data_mesh()
        fn = jax.jit(lambda k, x: aug.preprocess_train(k, x, cfg, size, "torch"))
        key = jax.random.key(0)

        pending = []

        def step():
            batch = pipeline.to_global(next(it), mesh)
            out = fn(jax.random.fold_in(key, it.step), batch["image"])
            # Wait for the previous batch only: the next host batch overlaps device work, as in
            # a training loop with asynchronous dispatch.
            if pending:
                pending.pop().block_until_ready()
            pending.append(out)

        return _rate(step, seconds)
    finally:
        it.close()


def _augment_config():
    import ml_collections
    return ml_collections.ConfigDict({
        "rotation_deg": DEGREES, "shear_deg": 0.0, "zoom": ZOOM, "translate": TRANSLATE,
        "hflip": True, "fill_mode": "reflect", "fill_value": 0.0, "random_resized_crop": False,
        "rrc_scale": (0.5, 1.0), "brightness": 0.0, "contrast": 0.0})


class _JpegDataset:
    """The PyTorch-style baseline: decode a JPEG with PIL and augment it per item."""

    def __init__(self, paths: list[str], size: int):
        from torchvision import transforms as T
        self.paths = paths
        self.transform = T.Compose([
            T.Resize((size, size)),
            T.RandomAffine(DEGREES, translate=(TRANSLATE, TRANSLATE), scale=(1 - ZOOM, 1 + ZOOM)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB")), 0


def bench_torch(paths: list[str], size: int, workers: int, seconds: float) -> float:
    import torch

    loader = torch.utils.data.DataLoader(_JpegDataset(paths, size), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0,
                                         # fork after JAX started its threads can deadlock
                                         multiprocessing_context="spawn" if workers else None)
    state = {"it": iter(loader)}

    def step():
        try:
            next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            next(state["it"])

    return _rate(step, seconds)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-npy", help="a uint8 [N,S,S,3] .npy cache (default: decode LFW)")
    parser.add_argument("--jpeg-root", default=LFW, help="JPEG folder for the torch baseline")
    parser.add_argument("--num", type=int, default=4000, help="images to use")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per row")
    args = parser.parse_args(argv)

    import jax

    cores = len(os.sched_getaffinity(0))
    paths = _jpeg_paths(args.jpeg_root, args.num) if os.path.isdir(args.jpeg_root) else []
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {cores} cores, batch {BATCH}, "
          f"load average {os.getloadavg()[0]:.2f}, "
          f"{len(paths) or 'no'} JPEGs from {args.jpeg_root if paths else '-'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="facejax-bench-") as tmp:
        for size in args.sizes:
            images = _cache(paths, size, args.num, args.images_npy, tmp)
            if images.shape[1] != size and args.images_npy:
                print(f"note: {args.images_npy} holds {images.shape[1]}px images; "
                      f"the model input is resized to {size}")
            torch_rate = bench_torch(paths, size, 2, args.seconds) if paths else None
            rows.append((size, "torch DataLoader (PIL)", 2, torch_rate, torch_rate))
            for workers in (0, 2):
                rate = bench_grain(images, size, workers, args.seconds / 2, augment=False)
                rows.append((size, "grain host only", workers, rate, torch_rate))
                rate = bench_grain(images, size, workers, args.seconds, augment=True)
                rows.append((size, "grain + augment (jit)", workers, rate, torch_rate))
            print(f"  {size}px done, load average {os.getloadavg()[0]:.2f}", flush=True)

    print(f"\n| size | pipeline | workers | images/s | per core ({cores}) | vs torch |")
    print("|---|---|---|---|---|---|")
    for size, name, workers, rate, torch_rate in rows:
        if rate is None:
            continue
        ratio = f"{rate / torch_rate:.1f}x" if torch_rate else "-"
        print(f"| {size} | {name} | {workers} | {rate:,.0f} | {rate / cores:,.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    cli.run(main)
