"""Does `configs/dlib_resnet.py` help, or at least do no harm, on small face folders?

  .venv/bin/python bench/face_recipe.py --att_aligned /tmp/att_aligned   # about 30 min, 2 cores
  .venv/bin/python bench/face_recipe.py --table                           # rebuild the table only

Each cell runs the face config as a new user would (train -> export -> index -> evaluate, the
scripts' own functions, in a subprocess) on one small folder, with one recipe:
- `untrained`: `--config.train.epochs=0`, dlib's descriptor as it ships;
- `old`: the config as it was written before 2026-12-05 (random cosine head, the whole network at
  Adam 1e-4, 5 epochs), run with today's loop, which keeps the starting point when no epoch
  beats it on validation;
- `config`: `configs/dlib_resnet.py` as written now;
- `*_trained`: the same recipe, but the run keeps its last epoch, so the test columns show what
  training itself did.
Folders: LFW subsets of 10, 20 and 40 identities (aligned LFW, the ArcFace-112 -> dlib chip
adapter as `data.face_crop`) and aligned AT&T (40 x 10; align it first with
`scripts/align_faces.py --src att --dst /tmp/att_aligned --detector hog,whole`).
Reports test Top-1 / mAP@R of the checkpoint that the run keeps, the epochs run, whether the
starting point was kept, and the validation Top-1 per epoch (epoch 0 = untrained).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LFW = os.path.join(ROOT, "..", "shared", "data", "faces", "lfw_aligned")
ADAPTER = "(0.2086,0.075,1.0704,0.9367)"
FOLDERS = {  # name -> overrides (the LFW subsets are hash-picked identities)
    "lfw10": [f"data.root={LFW}", f"data.face_crop={ADAPTER}", "data.max_classes=10",
              "data.min_images_per_class=5"],
    "lfw20": [f"data.root={LFW}", f"data.face_crop={ADAPTER}", "data.max_classes=20",
              "data.min_images_per_class=10"],
    "lfw40": [f"data.root={LFW}", f"data.face_crop={ADAPTER}", "data.max_classes=40",
              "data.min_images_per_class=5"],
}
OLD = ["train.head_init=random", "train.finetune=all", "train.backbone_lr_mult=1.0",
       "train.freeze_bn=False", "train.optimizer=adam", "train.weight_decay=0.0",
       "train.learning_rate=1e-4", "train.warmup_epochs=0.0", "train.epochs=5",
       "train.batch_size=64"]
# The run keeps its last epoch (val_loss falls steadily): the test columns then show what the
# trained network does, not the starting point that the loop keeps when training does not help.
LAST = ["train.monitor=val_loss", "train.early_stopping_patience=0"]
RECIPES = {
    "untrained": ["train.epochs=0"],
    "old": OLD,
    "old_trained": OLD + LAST,
    "config": [],
    "config_trained": LAST,
    # Ablation: the config with BatchNorm statistics updating on the small folder.
    "config_bn_trained": ["train.freeze_bn=False"] + LAST,
}


def run_cell(workdir: str, overrides: list[str]) -> dict:
    py = sys.executable
    flags = [f"--config.{o}" for o in overrides]
    steps = [
        ["scripts/train.py", "--config", "configs/dlib_resnet.py", "--workdir", workdir,
         *flags],
        ["scripts/export.py", "--workdir", workdir],
        ["scripts/build_index.py", "--workdir", workdir, "--no_progress"],
        ["scripts/eval_topk.py", "--workdir", workdir, "--no_progress"],
    ]
    log_path = os.path.join(workdir + ".log")
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    with open(log_path, "a") as log:
        for step in steps:
            rc = subprocess.call([py, *step], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if rc:
                raise SystemExit(f"{' '.join(step[:1])} failed (rc {rc}); see {log_path}")
    report = json.load(open(os.path.join(workdir, "report", "report.json")))
    history = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    val = [(r.get("epoch"), r.get("val_top1")) for r in history if r.get("val_top1") is not None]
    val_map = [(r.get("epoch"), r.get("val_map_r")) for r in history
               if r.get("val_map_r") is not None]
    best = [r.get("epoch") for r in history if r.get("best")]
    epochs = max((r.get("epoch") or 0 for r in history), default=0)
    return dict(metrics=report["metrics"], num_queries=report.get("num_queries"),
                gallery_size=report.get("gallery_size"), val_top1=val, val_map_r=val_map,
                kept_starting_point=bool(epochs and best and best[-1] == 0),
                best_epoch=best[-1] if best else None, epochs_run=epochs)


def table(cells: dict) -> str:
    lines = ["| folder | recipe | test Top-1 | test mAP@R | queries / gallery | epochs | best "
             "epoch | val Top-1 by epoch (0 = untrained) | val mAP@R by epoch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(cells, key=lambda k: (k.split("/")[0], list(RECIPES).index(k.split("/")[1])
                                            if k.split("/")[1] in RECIPES else 9)):
        folder, recipe = key.split("/")
        c = cells[key]
        m = c["metrics"]
        curve = " ".join(f"{v:.2f}" for _, v in c["val_top1"]) or "—"
        curve_map = " ".join(f"{v:.3f}" for _, v in c.get("val_map_r", [])) or "—"
        lines.append(f"| {folder} | {recipe} | {m['top1']:.3f} | {m['map@r']:.3f} | "
                     f"{c['num_queries']} / {c['gallery_size']} | {c.get('epochs_run', '—')} | "
                     f"{c.get('best_epoch', '—')} | {curve} | {curve_map} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/face_recipe", help="cell folders and results.json")
    p.add_argument("--att_aligned", default="", help="aligned AT&T folder (adds the att rows)")
    p.add_argument("--att_raw", default="", help="raw AT&T folder (adds the att_raw rows: "
                   "what a wrong crop costs)")
    p.add_argument("--folders", default="", help="comma list of folders (default: all)")
    p.add_argument("--recipes", default="", help="comma list of recipes (default: all)")
    p.add_argument("--table", action="store_true", help="only print the table of saved cells")
    args = p.parse_args(argv)
    folders = dict(FOLDERS)
    if args.att_aligned:
        folders["att"] = [f"data.root={os.path.abspath(args.att_aligned)}"]
    if args.att_raw:
        folders["att_raw"] = [f"data.root={os.path.abspath(args.att_raw)}"]
    results_path = os.path.join(args.out, "results.json")
    cells = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if not args.table:
        pick_f = args.folders.split(",") if args.folders else list(folders)
        pick_r = args.recipes.split(",") if args.recipes else list(RECIPES)
        for f in pick_f:
            for r in pick_r:
                key = f"{f}/{r}"
                if key in cells:
                    continue
                print(f"== {key}", flush=True)
                cells[key] = run_cell(os.path.join(args.out, f, r), folders[f] + RECIPES[r])
                os.makedirs(args.out, exist_ok=True)
                with open(results_path + ".tmp", "w") as fh:
                    json.dump(cells, fh, indent=1)
                os.replace(results_path + ".tmp", results_path)
                print(table({key: cells[key]}).splitlines()[-1], flush=True)
    print(table(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
