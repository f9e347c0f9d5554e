"""Embeds every image of a folder with an exported embedder -> .npy (real data for bench/ann.py).

    .venv/bin/python bench/embed_folder.py --embedder runs/X/embedder \
        --folder ../shared/data/faces/lfw_aligned --out bench/out/lfw_dlib.npy \
        [--face_crop 0.2086 0.075 1.0704 0.9367]

The images are decoded into facejax's uint8 cache at the embedder's input size, resize mode and
face crop (the embedder's meta; --face_crop overrides it, for artifacts exported before the meta
recorded it), then embedded in batches. Writes `--out` ([N, D] float32) and, beside it,
`<out>.labels.npy` (class index per row) and `<out>.paths.txt`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from facejax import cli
from facejax.data.cache import cache_listing
from facejax.data.sources import scan_folder
from facejax.retrieval.embed import load_embedder


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embedder", required=True, help="an exported embedder folder")
    p.add_argument("--folder", required=True, help="class-per-subfolder images")
    p.add_argument("--out", required=True, help=".npy to write")
    p.add_argument("--face_crop", type=float, nargs=4, default=None)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    embedder = load_embedder(args.embedder)
    meta = embedder.meta
    crop = args.face_crop if args.face_crop is not None else meta.get("face_crop") or ()
    listing = scan_folder(args.folder)
    cached = cache_listing(listing, image_size=embedder.cache_size,
                           resize_mode=meta["resize_mode"], face_crop=tuple(crop))
    emb = embedder.embed_array(cached.images, batch_size=args.batch)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.save(args.out, emb)
    np.save(args.out + ".labels.npy", listing.labels[cached.rows])
    with open(args.out + ".paths.txt", "w") as f:
        f.write("\n".join(listing.paths[r] for r in cached.rows) + "\n")
    print(f"wrote {args.out}: {emb.shape[0]} x {emb.shape[1]} embeddings of {args.folder} "
          f"({meta['model']}, face_crop={list(crop)})")
    return 0


if __name__ == "__main__":
    cli.run(main)
