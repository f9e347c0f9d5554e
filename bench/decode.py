"""Decode + resize throughput into the uint8 cache, against a PIL torch-style loader (images/s).

    python bench/decode.py                      # ../shared/data/faces/lfw_aligned, 112 and 224 px
    python bench/decode.py --root DIR --sizes 128 --workers 1 2 4 --rounds 3

For each size it times, on the same files in the same run:
  - pil_loop:    Image.open -> convert('RGB') -> resize(bilinear) -> np.asarray, one process
                 (what a torchvision ImageFolder + Resize does per sample, minus the tensor);
  - decode_image: facejax's decoder alone (EXIF, mode checks, aspect-preserving resize + crop);
  - cache_wN:    a full cache build with N decode processes (scan excluded; stat + manifest
                 hash + decode + writing images.npy included), into a temporary cache folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from facejax import cli
from facejax.data import cache, decode, sources

DEFAULT_ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "faces",
                            "lfw_aligned")


def _rate(n: int, fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return n / (time.perf_counter() - start)


def _pil_loop(files: list[str], size: int) -> None:
    for path in files:
        with Image.open(path) as im:
            np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))


def _decode_loop(files: list[str], size: int) -> None:
    for path in files:
        decode.decode_image(path, size)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.normpath(DEFAULT_ROOT))
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--rounds", type=int, default=1, help="best of N interleaved rounds")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    listing = sources.scan_folder(args.root)
    scan_s = time.perf_counter() - t0
    if args.limit:
        listing = listing.subset(np.arange(min(args.limit, len(listing))))
    files = [os.path.join(listing.root, p) for p in listing.paths]
    n = len(files)
    cpus = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{n} images from {args.root} (scan {scan_s:.2f} s), {cpus} CPUs visible, "
          f"load average {load}, python {sys.version.split()[0]}")
    print(f"{'size':>5} {'method':>13} {'images/s':>9} {'vs pil_loop':>11}")
    for size in args.sizes:
        _pil_loop(files[:50], size)  # warm the page cache and imports
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, best of N: the machine may be shared
            rates = {"pil_loop": _rate(n, _pil_loop, files, size),
                     "decode_image": _rate(n, _decode_loop, files, size)}
            for w in args.workers:
                tmp = tempfile.mkdtemp(prefix="facejax-bench-")
                try:
                    rates[f"cache_w{w}"] = _rate(n, cache.cache_listing, listing, image_size=size,
                                                 resize_mode="crop", cache_dir=tmp, workers=w)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            best = {k: max(v, best.get(k, 0.0)) for k, v in rates.items()}
        for name, rate in best.items():
            ratio = rate / best["pil_loop"]
            print(f"{size:>5} {name:>13} {rate:>9.0f} {ratio:>10.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    cli.run(main)
