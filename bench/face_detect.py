"""Face detection rate and speed of the aligner's detectors (hog, cnn, whole) on real faces.

    .venv/bin/python bench/face_detect.py                       # LFW aligned crops + AT&T
    .venv/bin/python bench/face_detect.py --lfw_images 500 --att ../shared/data/faces/att

For each image folder and detector: the share of images where a face was found (and aligned),
and the median milliseconds per image (detection + landmarks + chip), one process, after one
warm-up image. The LFW copy is 112 px crops already aligned to the ArcFace template (tight
crops); AT&T is 92x112 greyscale, one face filling most of the frame.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from facejax.data import decode
from facejax.data.align_dlib import FaceAligner, list_images

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data", "faces")


def measure(root: str, files: list[str], detector: str, upsample: int) -> dict:
    aligner = FaceAligner(detector=detector, upsample=upsample)
    images = [decode.read_rgb(os.path.join(root, f)) for f in files]
    aligner.align(images[0])
    found, ms = 0, []
    for img in images:
        t0 = time.perf_counter()
        found += aligner.align(img) is not None
        ms.append(1000 * (time.perf_counter() - t0))
    return dict(found=found, n=len(images), rate=found / len(images),
                ms=float(np.median(ms)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lfw", default=os.path.join(SHARED, "lfw_aligned"))
    p.add_argument("--att", default=os.path.join(SHARED, "att"))
    p.add_argument("--lfw_images", type=int, default=300, help="a seeded sample of LFW")
    p.add_argument("--detectors", default="hog,cnn,whole")
    p.add_argument("--upsample", type=int, default=1)
    args = p.parse_args()
    sets = []
    if os.path.isdir(args.lfw):
        files = list_images(args.lfw)
        pick = np.random.default_rng(0).choice(len(files), min(args.lfw_images, len(files)),
                                               replace=False)
        sets.append(("LFW aligned crops (112 px)", args.lfw, [files[i] for i in sorted(pick)]))
    if os.path.isdir(args.att):
        sets.append(("AT&T (92x112 grey)", args.att, list_images(args.att)))
    if not sets:
        sys.exit(f"no data: neither {args.lfw} nor {args.att} exists")
    print(f"# face detection, {datetime.date.today()}, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores, upsample {args.upsample}")
    print("| images | detector | found | rate | ms/image (median) |\n|---|---|---|---|---|")
    for name, root, files in sets:
        for det in args.detectors.split(","):
            r = measure(root, files, det, args.upsample)
            print(f"| {name} | {det} | {r['found']}/{r['n']} | {r['rate']:.3f} | "
                  f"{r['ms']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
