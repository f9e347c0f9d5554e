"""Align raw face photos with dlib landmarks: one chip per image, same folder layout.

  python scripts/align_faces.py --src photos/ --dst photos_aligned/ [--size 150 --padding 0.25]
      [--upsample 1] [--detector hog|cnn|whole|hog,whole] [--predictor shape_predictor_5...dat]

Needs `pip install dlib-bin face_recognition_models`. The largest face of each image is cut as
dlib.get_face_chip does (150/0.25 is what dlib's face embedder expects). Rerunning resumes:
existing chips are kept. Images without a face or unreadable are skipped and counted.

--detector: `hog` (dlib's default, fast), `cnn` (dlib's MMOD detector: finds faces in hard
light and odd poses that HOG misses, much slower on a CPU), `whole` (the image is already a face
crop: fit the landmarks inside the whole image), or a comma list tried in order, e.g.
`cnn,whole` for tight face crops. The summary counts the faces each detector found.
"""

from __future__ import annotations

import argparse

from facejax import cli
from facejax.data.align_dlib import align_folder

_SHOW_SKIPPED = 10


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="folder of photos (class sub-folders)")
    parser.add_argument("--dst", required=True, help="output folder for the chips")
    parser.add_argument("--size", type=int, default=150, help="chip side in pixels")
    parser.add_argument("--padding", type=float, default=0.25, help="dlib chip padding")
    parser.add_argument("--upsample", type=int, default=1,
                        help="detector upsampling steps (finds smaller faces, slower)")
    parser.add_argument("--predictor", default=None, help="5-point landmark model file")
    parser.add_argument("--detector", default="hog",
                        help="hog | cnn | whole, or a comma list tried in order (hog,whole)")
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    summary = align_folder(args.src, args.dst, args.size, args.padding, args.upsample,
                           predictor=args.predictor, detector=args.detector,
                           progress=not args.no_progress)
    for rel, reason in summary.skipped[:_SHOW_SKIPPED]:
        print(f"skipped {rel}: {reason}")
    if len(summary.skipped) > _SHOW_SKIPPED:
        print(f"... and {len(summary.skipped) - _SHOW_SKIPPED} more")
    print(summary.line())
    return 0


if __name__ == "__main__":
    cli.run(main)
