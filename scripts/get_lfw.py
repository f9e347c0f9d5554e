"""Download LFW and its pairs list, check them, and align the faces for the dlib face model.

  python scripts/get_lfw.py --dst data/lfw            # then:
  python scripts/train.py --config configs/dlib_resnet.py --workdir runs/lfw \
      --config.data.root=data/lfw/aligned --config.train.epochs=0
  python scripts/eval_verification.py --workdir runs/lfw --pairs data/lfw/pairs.txt

Downloads lfw.tgz (173 MB) and pairs.txt with sha256 checks (the files scikit-learn uses),
unpacks them, and aligns every photo with dlib's detector and 5 landmarks into 150 px chips
(needs the faces extra: pip install -e ".[faces]"). Every step resumes after an interruption.
Offline, it says which file to fetch and where to put it.
"""

from __future__ import annotations

import argparse

from facejax import cli
from facejax.data import lfw


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dst", required=True, help="folder to write downloads/, raw/, "
                                                     "aligned/ and pairs.txt into")
    parser.add_argument("--no_align", action="store_true",
                        help="stop after unpacking (no dlib needed)")
    parser.add_argument("--archive_url", action="append", default=None,
                        help="a mirror of lfw.tgz (repeatable); the sha256 stays the official")
    parser.add_argument("--pairs_url", action="append", default=None,
                        help="a mirror of pairs.txt (repeatable)")
    parser.add_argument("--archive_sha256", default=lfw.ARCHIVE.sha256)
    parser.add_argument("--pairs_sha256", default=lfw.PAIRS.sha256)
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    archive = lfw.Remote(lfw.ARCHIVE.name, tuple(args.archive_url or lfw.ARCHIVE.urls),
                         args.archive_sha256)
    pairs = lfw.Remote(lfw.PAIRS.name, tuple(args.pairs_url or lfw.PAIRS.urls),
                       args.pairs_sha256)
    out = lfw.get_lfw(args.dst, align=not args.no_align, archive=archive, pairs=pairs,
                      progress=not args.no_progress)
    print(f"photos: {out['raw']}\npairs: {out['pairs']}")
    if out["aligned"]:
        print(f"{out['summary']}\naligned chips (data.root for configs/dlib_resnet.py): "
              f"{out['aligned']}")
    return 0


if __name__ == "__main__":
    cli.run(main)
