"""Face-alignment adapter: dlib's face embedder on ArcFace-aligned LFW, by preprocessing path.

  .venv/bin/python bench/face_align.py --lfw ../shared/data/faces/lfw_aligned \
      --pairs ../shared/data/faces/lfw_pairs.txt

dlib's ResNet (dlib_face_recognition_resnet_model_v1.dat, 128-d) expects 150x150 chips cut by
`dlib.get_face_chip(img, shape_5pt, 150, padding=0.25)`; the images here are 112x112 ArcFace
5-point crops. Variants, each scored with the LFW View-2 10-fold protocol
(facejax.retrieval.verification):
  a       naive resize 112 -> 150 (data.face_crop = ())
  b       data.face_crop = the box measured from dlib's own chips (calibration below)
  b68     data.face_crop = the box derived analytically: ArcFace's 5 reference points fitted
          (scale + offset) to the same points of dlib's 68-point mean face in a 150/0.25 chip
  c       dlib alignment: HOG detector (upsample 1, on the image padded by 1/4 side of black:
          a tight crop gives the detector no context) + 5-point predictor + get_face_chip;
          images without a detection fall back to b
  tight/loose  box b scaled by 0.9 / 1.1 about its centre (sensitivity)
Calibration: detector + predictor on --calib random images; each chip's `chip_details` rect is
the chip's square in the 112 image (angle ~0 on aligned faces); the box is its mean.
Descriptors are cached per variant under --cache, so reruns only redo the protocol. Writes
bench/out/face_align.{md,json}.
Columns: 10-fold accuracy with cosine on L2-normalised descriptors (mean ± std over folds), the
same with euclidean distance on dlib's raw descriptors, the accuracy of dlib's fixed rule
"same if distance < 0.6", ROC AUC, TAR@FAR=1e-3, preprocessing ms/img (decode + crop or
detect/landmarks/chip; descriptor cost is the same for all and shown once).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import time

import numpy as np

from facejax import cli
from facejax.data.decode import decode_image, read_rgb
from facejax.errors import ConfigError
from facejax.retrieval import verification as V

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
CHIP, PADDING = 150, 0.25
BATCH = 64
# ArcFace's 112x112 template (insightface `arcface_dst`): eyes, nose tip, mouth corners.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]])
# dlib's mean face (points 17..67 of the 68-point layout, unit square), from dlib's
# image_transforms/interpolation.h get_face_chip_details.
_MEAN_X = [0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
           0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
           0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
           0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
           0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
           0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
           0.553364, 0.490127, 0.42689]
_MEAN_Y = [0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
           0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
           0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
           0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
           0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
           0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
           0.784792, 0.824182, 0.831803, 0.824182]


def model_file(name: str) -> str:
    # find_spec, never import: face_recognition_models' __init__ needs pkg_resources.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("pip install face_recognition_models (dlib's model files)")
    return os.path.join(next(iter(spec.submodule_search_locations)), "models", name)


def analytic_box(side: int = 112) -> tuple[float, ...]:
    """ArcFace's points -> the same points of dlib's mean face in a 150/0.25 chip (least-squares
    scale + offset); the chip's square mapped back into the 112 image, in fractions."""
    m = np.stack([_MEAN_X, _MEAN_Y], 1)

    def pt(i):
        return m[np.asarray(i) - 17]

    template = np.stack([pt(range(36, 42)).mean(0), pt(range(42, 48)).mean(0), pt(30),
                         pt(48), pt(54)])
    chip = (PADDING + template) / (1 + 2 * PADDING) * CHIP  # dlib: pixel-centre coordinates
    a = np.zeros((10, 3))
    a[0::2, 0], a[0::2, 1] = ARCFACE_112[:, 0], 1
    a[1::2, 0], a[1::2, 2] = ARCFACE_112[:, 1], 1
    (s, ox, oy), *_ = np.linalg.lstsq(a, chip.reshape(-1), rcond=None)
    # Chip pixel centres 0..CHIP-1 <-> source coordinate (c - o) / s; edges half a pixel out.
    lo_x, hi_x = (-0.5 - ox) / s + 0.5, (CHIP - 0.5 - ox) / s + 0.5
    lo_y, hi_y = (-0.5 - oy) / s + 0.5, (CHIP - 0.5 - oy) / s + 0.5
    return tuple(round(float(v) / side, 4) for v in (lo_y, lo_x, hi_y, hi_x))


def scaled(box, factor: float) -> tuple[float, ...]:
    t, l, b, r = box
    cy, cx, h = (t + b) / 2, (l + r) / 2, (b - t) * factor / 2
    w = (r - l) * factor / 2
    return tuple(round(v, 4) for v in (cy - h, cx - w, cy + h, cx + w))


class DlibAligner:
    """facejax.data.align_dlib's detector + landmarks, on the image padded with black: a
    tight aligned crop alone gives the HOG detector too little context."""

    def __init__(self, upsample: int = 1, context: float = 0.25):
        from facejax.data.align_dlib import FaceAligner

        self.aligner = FaceAligner(CHIP, PADDING, upsample)
        self.dlib, self.context = self.aligner.dlib, context

    def shape(self, img: np.ndarray):
        """The 5 landmarks (in `img` coordinates) of the largest face, or None."""
        pad = int(round(self.context * max(img.shape[:2])))
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0))) if pad else img
        s = self.aligner.landmarks(padded)
        if s is None:
            return None
        r = s.rect
        parts = [self.dlib.point(p.x - pad, p.y - pad) for p in s.parts()]
        rect = self.dlib.rectangle(r.left() - pad, r.top() - pad, r.right() - pad,
                                   r.bottom() - pad)
        return self.dlib.full_object_detection(rect, parts)

    def chip(self, img: np.ndarray, shape) -> np.ndarray:
        return np.asarray(self.dlib.get_face_chip(img, shape, size=CHIP, padding=PADDING))

    def box_in_image(self, shape, side: int) -> tuple[float, ...]:
        """The chip's square in the image (edge coordinates, fractions of `side`)."""
        d = self.dlib.get_face_chip_details(shape, CHIP, PADDING)
        r = d.rect
        w = r.right() - r.left()
        # dlib maps chip pixel centres 0..CHIP-1 onto [left, right] (pixel centres); face_crop
        # boxes are in edge coordinates, so widen by half a chip pixel on each side.
        half = 0.5 * w / (CHIP - 1)
        return ((r.top() + 0.5 - half) / side, (r.left() + 0.5 - half) / side,
                (r.bottom() + 0.5 + half) / side, (r.right() + 0.5 + half) / side,
                float(np.degrees(d.angle)))


def calibrate(paths, root, aligner: DlibAligner, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), min(n, len(paths)), replace=False)
    boxes = []
    for i in pick:
        img = read_rgb(os.path.join(root, paths[i]))
        shape = aligner.shape(img)
        if shape is not None:
            boxes.append(aligner.box_in_image(shape, img.shape[0]))
    b = np.asarray(boxes)
    mean = tuple(round(float(v), 4) for v in b[:, :4].mean(0))
    return dict(box=mean, std=b[:, :4].std(0).round(4).tolist(), images=len(pick),
                detected=len(boxes), mean_abs_angle_deg=float(np.abs(b[:, 4]).mean()))


# ----------------------------------------------------------------------------- descriptors

def compute(name: str, paths, root, make_chip, cache_dir: str, recognizer) -> dict:
    key = hashlib.sha256(("\n".join(paths) + name).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{name}-{key}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return dict(desc=z["desc"], prep_ms=float(z["prep_ms"]), desc_ms=float(z["desc_ms"]),
                    fallback=int(z["fallback"]))
    desc = np.empty((len(paths), 128), np.float32)
    prep = run = 0.0
    fallback = 0
    start = time.perf_counter()
    for s in range(0, len(paths), BATCH):
        t0 = time.perf_counter()
        chips = []
        for p in paths[s:s + BATCH]:
            chip, fell_back = make_chip(os.path.join(root, p))
            chips.append(np.ascontiguousarray(chip))
            fallback += fell_back
        t1 = time.perf_counter()
        desc[s:s + len(chips)] = np.asarray(recognizer.compute_face_descriptor(chips))
        prep += t1 - t0
        run += time.perf_counter() - t1
        done = s + len(chips)
        if done % (BATCH * 20) == 0 or done == len(paths):
            eta = (time.perf_counter() - start) / done * (len(paths) - done)
            print(f"  {name}: {done}/{len(paths)} ({eta / 60:.1f} min left)", flush=True)
    out = dict(desc=desc, prep_ms=1e3 * prep / len(paths), desc_ms=1e3 * run / len(paths),
               fallback=fallback)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, path)
    return out


def score(pairs: V.Pairs, index_of: dict, desc: np.ndarray) -> dict:
    cos = V.verify_embeddings(pairs, desc, index_of, metric="cosine")
    unit = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    euc_unit = V.verify_embeddings(pairs, unit, index_of, metric="euclidean")
    # On unit vectors ||a-b||^2 = 2 - 2 cos: the protocol must pick the same cuts.
    assert np.allclose(cos["fold_accuracies"], euc_unit["fold_accuracies"]), (cos, euc_unit)
    raw = V.verify_embeddings(pairs, desc, index_of, metric="euclidean")
    a = np.asarray([index_of[p] for p in pairs.left])
    b = np.asarray([index_of[p] for p in pairs.right])
    fixed = V.accuracy_at(V.pair_scores(desc[a], desc[b], "euclidean"), pairs.same, -0.6)
    return dict(cosine=cos, euclidean_raw=raw, dlib_0_6=fixed)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lfw", required=True, help="folder of 112x112 ArcFace-aligned LFW images")
    ap.add_argument("--pairs", required=True, help="LFW View-2 pairs.txt")
    ap.add_argument("--cache", default="/tmp/facejax_face_align")
    ap.add_argument("--calib", type=int, default=300, help="images used to measure the box")
    ap.add_argument("--variants", default="a,b,c,b68,tight,loose")
    ap.add_argument("--out", default=os.path.join(OUT, "face_align.md"),
                    help="write the table (.md) and the numbers (.json) here")
    args = ap.parse_args(argv)

    import dlib

    pairs = V.read_pairs(args.pairs, root=args.lfw)
    paths = pairs.images()
    index_of = {p: i for i, p in enumerate(paths)}
    print(pairs.summary(), flush=True)
    aligner = DlibAligner()
    recognizer = dlib.face_recognition_model_v1(
        model_file("dlib_face_recognition_resnet_model_v1.dat"))

    calib_path = os.path.join(args.cache, f"calibration-{args.calib}.json")
    if os.path.exists(calib_path):
        with open(calib_path) as f:
            calib = json.load(f)
    else:
        calib = calibrate(paths, args.lfw, aligner, args.calib)
        os.makedirs(args.cache, exist_ok=True)
        with open(calib_path, "w") as f:
            json.dump(calib, f)
    box = tuple(calib["box"])
    boxes = {"a": (), "b": box, "b68": analytic_box(), "tight": scaled(box, 0.9),
             "loose": scaled(box, 1.1)}
    print(f"calibrated box (top, left, bottom, right) = {box} +- {calib['std']} from "
          f"{calib['detected']}/{calib['images']} detections, mean |angle| "
          f"{calib['mean_abs_angle_deg']:.2f} deg; analytic box = {boxes['b68']}", flush=True)

    def box_chip(b):
        return lambda p: (decode_image(p, CHIP, "crop", face_crop=b), 0)

    def dlib_chip(p):
        img = read_rgb(p)
        shape = aligner.shape(img)
        if shape is None:
            return decode_image(p, CHIP, "crop", face_crop=box), 1
        return aligner.chip(img, shape), 0

    labels = {"a": "naive resize 112->150", "b": "face_crop, calibrated box",
              "b68": "face_crop, analytic box (68-pt mean face)",
              "c": "dlib detector + 5-pt landmarks + get_face_chip",
              "tight": "face_crop, box b x0.9", "loose": "face_crop, box b x1.1"}
    rows = []
    for name in args.variants.split(","):
        if name not in labels:
            raise ConfigError(f"unknown variant {name!r}; choose from {sorted(labels)}")
        make = dlib_chip if name == "c" else box_chip(boxes[name])
        tag = name if name in ("a", "c") else f"{name}-{'_'.join(map(str, boxes[name]))}"
        got = compute(tag, paths, args.lfw, make, args.cache, recognizer)
        res = score(pairs, index_of, got["desc"])
        rows.append(dict(variant=name, what=labels[name], box=boxes.get(name, box),
                         prep_ms=got["prep_ms"], desc_ms=got["desc_ms"],
                         fallback=got["fallback"], **res))
        print(f"  {name}: {V.format_result(res['cosine'])}", flush=True)

    lines = [f"LFW View-2 ({pairs.summary()}), dlib_face_recognition_resnet_model_v1, "
             f"150x150 chips. Calibrated box {box}; analytic box {boxes['b68']}.", "",
             "| variant | preprocessing | face_crop box (t, l, b, r) | acc cosine (10-fold) | "
             "acc euclid raw (10-fold) | acc @ dist<0.6 | AUC | TAR@FAR=1e-3 | prep ms/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, e = r["cosine"], r["euclidean_raw"]
        box_s = "()" if not r["box"] else ", ".join(f"{v:.3f}" for v in r["box"])
        if r["variant"] == "c":
            box_s = f"(fallback {r['fallback']} imgs: b)"
        lines.append(
            f"| {r['variant']} | {r['what']} | {box_s} | {100 * c['accuracy']:.2f} ± "
            f"{100 * c['accuracy_std']:.2f} | {100 * e['accuracy']:.2f} ± "
            f"{100 * e['accuracy_std']:.2f} | {100 * r['dlib_0_6']:.2f} | {c['auc']:.4f} | "
            f"{100 * c['tar_at_far']['0.001']['tar']:.2f} | {r['prep_ms']:.2f} |")
    desc_ms = np.mean([r["desc_ms"] for r in rows])
    lines += ["", f"dlib descriptor: {desc_ms:.1f} ms/img on this CPU (batch {BATCH}), the same "
                  f"for every variant."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        base = os.path.splitext(args.out)[0]
        with open(base + ".md", "w") as f:
            f.write(table + "\n")
        with open(base + ".json", "w") as f:
            json.dump(dict(calibration=calib, analytic_box=boxes["b68"], rows=rows), f,
                      indent=1, default=list)
    return 0


if __name__ == "__main__":
    cli.run(main)
