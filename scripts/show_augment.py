"""Write a PNG grid of augmented samples: originals on top, one augmented draw per row below.

  python scripts/show_augment.py --config configs/common.py:base --out grid.png
  python scripts/show_augment.py --images ~/faces --config.augment.rotation_deg=30 --out grid.png

Images come from `--images DIR` (any image files under it), else from the configured dataset
(`prepare_data`, train split), else a synthetic pattern whose asymmetry shows every transform.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from facejax import cli, config
from facejax.config_schema import base as _base_config
from facejax.errors import DataError

DEFAULT_OUT = "augment.png"


def _load_config(spec: str | None, overrides: list[str]):
    if spec:
        return config.load_config(spec, overrides)
    cfg = _base_config()
    for item in overrides:
        config.apply_override(cfg, item)
    return cfg


def out_path(out: str) -> str:
    """`--out` as a PNG path: a folder (existing, or ending in a slash) gets augment.png."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, DEFAULT_OUT)
    return out


def synthetic_pattern(size: int) -> np.ndarray:
    """A checkerboard with a red top-left corner and a big white 'F': no symmetry, so rotation,
    shear, zoom and flips are all visible. uint8 [size, size, 3]."""
    y, x = np.mgrid[:size, :size] / size
    check = ((np.floor(y * 8) + np.floor(x * 8)) % 2).astype(np.float32)
    img = np.stack([0.25 + 0.5 * x, 0.3 + 0.2 * check, 0.75 - 0.5 * y], -1)
    img[(y < 0.2) & (x < 0.2)] = (0.9, 0.1, 0.1)
    stem = (x > 0.35) & (x < 0.47) & (y > 0.2) & (y < 0.85)
    top = (x > 0.35) & (x < 0.75) & (y > 0.2) & (y < 0.3)
    mid = (x > 0.35) & (x < 0.65) & (y > 0.47) & (y < 0.56)
    img[stem | top | mid] = 1.0
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _from_folder(directory: str, num: int, size: int, seed: int) -> np.ndarray:
    from facejax.data.decode import BadImage, decode_image
    from facejax.data.sources import IMAGE_EXTS

    if not os.path.isdir(directory):
        raise DataError(f"--images: not a directory: {directory}")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(directory) for f in files
                   if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    np.random.default_rng(seed).shuffle(paths)
    images = []
    for path in paths:
        try:
            images.append(decode_image(path, size))
        except BadImage:
            continue  # a sample grid simply skips unreadable files
        if len(images) == num:
            break
    if not images:
        raise DataError(f"--images: no readable image under {directory}")
    return np.stack(images)


def _from_dataset(cfg, num: int, seed: int) -> np.ndarray:
    from facejax.data.prepare import prepare_data

    data = prepare_data(cfg.data)
    rows = np.random.default_rng(seed).permutation(data.train.indices)[:num]
    return np.asarray(data.images[np.sort(rows)])


def _grid(original: np.ndarray, augmented: list[np.ndarray], title: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = 1 + len(augmented), len(original)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.6), squeeze=False)
    for r, batch in enumerate([original / 255.0] + augmented):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(np.clip(batch[c], 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel("original" if r == 0 else f"draw {r}", fontsize=8)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    overrides, rest = config.split_override_args(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config",
                        help="config file (path.py or path.py:arg); default: the schema's base()")
    parser.add_argument("--out", required=True,
                        help=f"PNG file to write (a folder: {DEFAULT_OUT} in it)")
    parser.add_argument("--images", help="folder of images to sample from instead of the dataset")
    parser.add_argument("--num", type=int, default=6, help="images per row")
    parser.add_argument("--rows", type=int, default=4, help="augmented rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(rest)
    if args.num < 1 or args.rows < 1:
        raise DataError("--num and --rows must be at least 1")
    cfg = _load_config(args.config, overrides)
    size = cfg.data.image_size
    if args.images:
        images = _from_folder(args.images, args.num, size, args.seed)
    elif cfg.data.root or cfg.data.source == "idx":
        images = _from_dataset(cfg, args.num, args.seed)
    else:
        print("no data configured: using a synthetic pattern")
        images = np.repeat(synthetic_pattern(size)[None], args.num, axis=0)

    import jax

    from facejax.data.augment import augment_batch

    fn = jax.jit(lambda key, x: augment_batch(key, x, cfg.augment))
    key = jax.random.key(args.seed)
    augmented = [np.asarray(fn(jax.random.fold_in(key, r), images)) for r in range(args.rows)]
    a = cfg.augment
    title = (f"rot ±{a.rotation_deg}°  shear ±{a.shear_deg}°  zoom ±{a.zoom}  "
             f"shift ±{a.translate}  hflip {a.hflip}  fill {a.fill_mode}  "
             f"rrc {a.random_resized_crop}  "
             f"brightness ±{a.brightness}  contrast ±{a.contrast}")
    out = out_path(args.out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _grid(images, augmented, title, out)
    print(f"wrote {out} ({len(images)} images x {args.rows} draws)")
    return 0


if __name__ == "__main__":
    cli.run(main)
