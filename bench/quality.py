"""Face-search quality on LFW: models x recipes x protocols x seeds -> QUALITY.md / QUALITY.json.

  .venv/bin/python bench/quality.py                       # the full grid (hours on 2 cores)
  .venv/bin/python bench/quality.py --quick               # the cheap rows, 1 seed
  .venv/bin/python bench/quality.py --models dlib_resnet --recipes features,best \
      --protocols open_set --seeds 0,1,2
  .venv/bin/python bench/quality.py --table               # only rebuild QUALITY.md

Each cell (model, recipe, protocol, seed) is `configs/lfw.py:model,recipe,protocol,seed` run
through train -> export -> index -> evaluate in its own process, in
`--out/<protocol>/<model>-<recipe>/seed<k>/`. A cell whose `cell.json` exists is not rerun,
and an interrupted cell resumes from its last checkpoint, so the command is resumable. Seed-0
cells of `features` rows (no training) also get LFW 10-fold pair verification when the pairs file
and `facejax.retrieval.verify_run` are there. Peak memory is the cell process's max RSS.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
from lfw import PROTOCOLS, RECIPES  # noqa: E402

from facejax import cli  # noqa: E402
from facejax.errors import ConfigError, DataError  # noqa: E402

SEED_MODELS = ("scratch_cnn", "resnet18", "resnet50", "resnet50v2", "vgg16")
# The paper's future work (issue 14): MobileNet, DenseNet, Inception (Keras ImageNet layouts).
ZOO_MODELS = ("mobilenet_v2", "mobilenet_v2_035", "mobilenet_v3_small", "mobilenet_v3_large",
              "densenet121", "densenet169", "inception_v3")
MODELS = ("raw_pixels",) + SEED_MODELS + ("efficientnet_lite0", "dlib_resnet") + ZOO_MODELS
# The paper's Table 3 (closed-set celebrity faces).
PAPER = {
    "resnet50": ("transfer learning ResNet50", 0.42, 0.45, 0.50),
    "vgg16": ("transfer learning VGG16", 0.30, 0.29, 0.397),
    "resnet50v2": ("transfer learning ResNet50V2", 0.49, 0.50, 0.615),
    "scratch_cnn": ("CNN from scratch", 0.31, 0.33, 0.50),
    "resnet18": ("pre-trained ResNet18", 0.47, 0.56, 0.59),
}
QUICK = [  # (model, recipe): what a 2-core machine runs in about an hour
    ("raw_pixels", "features"), ("efficientnet_lite0", "features"), ("dlib_resnet", "features"),
    ("scratch_cnn", "seed"), ("scratch_cnn", "best"), ("resnet18", "seed"), ("resnet18", "best"),
    ("dlib_resnet", "best"),
]
COLUMNS = ("top1", "top5", "top10", "precision@10", "map@r", "f1@10")
PAIRS = "../shared/data/faces/lfw_pairs.txt"


def cell_dir(out: str, model: str, recipe: str, protocol: str, seed: int,
             max_epochs: int = 0) -> str:
    name = f"{model}-{recipe}" + (f"-e{max_epochs}" if max_epochs else "")
    return os.path.join(out, protocol, name, f"seed{seed}")


def run_cell(out: str, model: str, recipe: str, protocol: str, seed: int, pairs: str,
             overrides: tuple[str, ...] = (), max_epochs: int = 0) -> dict:
    """One cell in this process: train, export, index, evaluate; writes and returns cell.json.

    `overrides` are `a.b=value` config overrides (tests shrink the batch with them);
    `max_epochs` > 0 caps the recipe's epochs (a separate cell, labelled in the tables)."""
    from facejax.config import load_config
    from facejax.retrieval import workdir as wd
    from facejax.train.export import export_workdir
    from facejax.train.loop import train_and_evaluate

    workdir = cell_dir(out, model, recipe, protocol, seed, max_epochs)
    cfg = load_config(os.path.join(ROOT, "configs", "lfw.py") +
                      f":{model},{recipe},{protocol},{seed}", overrides)
    if max_epochs:
        cfg.train.epochs = min(int(cfg.train.epochs), int(max_epochs))
    t0 = time.time()
    summary = train_and_evaluate(cfg, workdir)
    t_train = time.time() - t0
    export_workdir(workdir)
    run_cfg = wd.read_run_config(workdir)
    t1 = time.time()
    wd.build_workdir_index(workdir, run_cfg, progress=False)
    result = wd.evaluate_workdir(workdir, run_cfg, progress=False)
    t_eval = time.time() - t1
    history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rates = [r["images_per_s"] for r in history if r.get("images_per_s")]
    cell = dict(
        model=model, recipe=recipe, protocol=protocol, seed=seed, max_epochs=max_epochs,
        epochs=int(cfg.train.epochs),
        pretrained=_weights_label(model, cfg.model.pretrained),
        input_size=int(cfg.model.input_size),
        metrics=result["metrics"], num_queries=result["num_queries"],
        index_backend=result["backend"], ann_recall=result.get("ann_recall"),
        gallery_size=result["gallery_size"], num_identities=result["num_identities"],
        num_train_classes=len(json.load(open(os.path.join(workdir, "classes.json")))),
        epochs_run=summary["epochs_run"], train_time_s=t_train, eval_time_s=t_eval,
        train_images_per_s=float(np.median(rates)) if rates else None,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    # The pairs do not depend on the split seed: seed 0 verifies for all.
    if recipe == "features" and seed == 0 and pairs and os.path.isfile(pairs):
        try:
            from facejax.retrieval.verify_run import verify_workdir
        except ImportError:
            verify_workdir = None
        if verify_workdir is not None:
            v = verify_workdir(workdir, pairs)
            cell["verification"] = _verification_summary(v)
    tmp = os.path.join(workdir, "cell.json.tmp")
    with open(tmp, "w") as f:
        json.dump(cell, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "cell.json"))
    return cell


def _verification_summary(v: dict) -> dict:
    return {k: v[k] for k in ("accuracy", "accuracy_std", "auc", "tar_at_far", "num_pairs")}


def _weights_label(model: str, pretrained: str) -> str:
    if model == "raw_pixels":
        return "none"
    if not pretrained:
        return "random init"
    from facejax.models import get_preset

    return {"dlib": "dlib face (~3M faces)"}.get(get_preset(model).converter, "ImageNet")


def plan(args) -> list[tuple[str, str, str, int]]:
    protocols = _pick(args.protocols, PROTOCOLS, "protocol")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick
                                                                        else [0, 1, 2])
    if args.models or args.recipes or not args.quick:
        models = _pick(args.models, MODELS, "model")
        recipes = _pick(args.recipes, ("features", "seed", "best"), "recipe", RECIPES)
        pairs = [(m, r) for m in models for r in recipes
                 if not (m == "raw_pixels" and r != "features")]
    else:
        pairs = QUICK
    return [(m, r, p, s) for p in protocols for (m, r) in pairs for s in seeds]


def _label(c: dict) -> str:
    return c["recipe"] + (f" ({c['max_epochs']} ep. max)" if c.get("max_epochs") else "")


def _pick(arg: str, default, what: str, allowed=None) -> list[str]:
    if not arg:
        return list(default)
    items = [x.strip() for x in arg.split(",") if x.strip()]
    bad = [x for x in items if x not in (allowed or default)]
    if bad:
        raise ConfigError(f"unknown {what} {bad}; choose from {', '.join(allowed or default)}")
    return items


def load_cells(out: str) -> list[dict]:
    cells = []
    for dirpath, _, files in os.walk(out):
        if "cell.json" in files:
            with open(os.path.join(dirpath, "cell.json")) as f:
                cells.append(json.load(f))
    return cells


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def table(cells: list[dict], protocol: str) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        if c["protocol"] == protocol:
            groups.setdefault((c["model"], c["recipe"], c.get("max_epochs", 0)), []).append(c)
    order = {m: i for i, m in enumerate(MODELS)}
    rorder = {r: i for i, r in enumerate(dict.fromkeys(("features", "seed", "best") + RECIPES))}
    head = ("| model | weights | recipe | seeds | Top-1 | Top-5 | Top-10 | P@10 | mAP@R | F1@10 "
            "| epochs | train s | train img/s | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (model, recipe, _), cs in sorted(groups.items(),
                                         key=lambda kv: (order.get(kv[0][0], 99),
                                                         rorder.get(kv[0][1], 99), kv[0][2])):
        cs = sorted(cs, key=lambda c: c["seed"])
        vals = [_mean_std([c["metrics"][k] for c in cs]) for k in COLUMNS]
        rate = [c["train_images_per_s"] for c in cs if c["train_images_per_s"]]
        lines.append("| " + " | ".join([
            model, cs[0]["pretrained"], _label(cs[0]), ",".join(str(c["seed"]) for c in cs),
            *vals, "/".join(str(c["epochs_run"]) for c in cs),
            f"{np.mean([c['train_time_s'] for c in cs]):.0f}",
            f"{np.mean(rate):.0f}" if rate else "—",
            f"{max(c['peak_rss_mb'] for c in cs):.0f}"]) + " |")
    return "\n".join(lines)


def verification_table(cells: list[dict]) -> str:
    rows = {}
    for c in cells:
        if c.get("verification"):
            rows[c["model"]] = c["verification"]
    if not rows:
        return ""
    out = ["| model | accuracy (10-fold) | ROC AUC | TAR @ FAR |", "|---|---|---|---|"]
    for m, v in rows.items():
        tar = ", ".join(f"{100 * x['tar']:.1f}% @ {k}" for k, x in v["tar_at_far"].items())
        out.append(f"| {m} | {100 * v['accuracy']:.2f} ± {100 * v['accuracy_std']:.2f} % "
                   f"| {v['auc']:.4f} | {tar} |")
    return "\n".join(out)


def write_outputs(out: str, cells: list[dict], md_path: str, command: str) -> None:
    cells = sorted(cells, key=lambda c: (c["protocol"], c["model"], c["recipe"],
                                         c.get("max_epochs", 0), c["seed"]))
    for path in (os.path.join(out, "quality.json"), os.path.splitext(md_path)[0] + ".json"):
        with open(path, "w") as f:
            json.dump(cells, f, indent=1)
    paper = ["| model (paper) | Top-1 | Top-5 | Top-10 |", "|---|---|---|---|"]
    paper += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in PAPER.values()]
    parts = [f"<!-- generated by `{command}` on {datetime.date.today()} "
             f"({platform.machine()}, {os.cpu_count()} cores); edit the prose in "
             f"bench/quality_notes.md -->"]
    notes = os.path.join(ROOT, "bench", "quality_notes.md")
    if os.path.isfile(notes):
        parts.append(open(notes).read().strip())
    parts += ["## Closed-set, LFW-260 (the paper's setting)", table(cells, "closed_set"),
              "The paper's Table 3, for reference (its own celebrity data and protocol):",
              "\n".join(paper),
              "## Open-set: identities never trained on, leave-one-out",
              table(cells, "open_set")]
    ver = verification_table(cells)
    if ver:
        parts += ["## LFW pair verification (no training on LFW)", ver]
    with open(md_path, "w") as f:
        f.write("\n\n".join(parts) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="data: $FACEJAX_LFW names the aligned LFW folder (one sub-folder per person;\n"
               "  default ../shared/data/faces/lfw_aligned)\n"
               "--quick without --models/--recipes runs these model/recipe rows:\n  "
               + "\n  ".join(f"{m}/{r}" for m, r in QUICK))
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "quality"),
                        help="folder of the cells' runs (<protocol>/<model>-<recipe>/seed<k>/); "
                             "cells already there are not rerun (default: %(default)s)")
    parser.add_argument("--md", default=os.path.join(ROOT, "QUALITY.md"),
                        help="Markdown tables to write, and the same name with .json beside it "
                             "(default: %(default)s)")
    parser.add_argument("--models", default="",
                        help=f"comma-separated models (default: all of {', '.join(MODELS)})")
    parser.add_argument("--recipes", default="",
                        help="comma-separated recipes of configs/lfw.py (default: features, "
                             f"seed, best; any of {', '.join(RECIPES)})")
    parser.add_argument("--protocols", default="",
                        help=f"comma-separated protocols (default: {', '.join(PROTOCOLS)})")
    parser.add_argument("--seeds", default="",
                        help="comma-separated split seeds (default: 0,1,2; 0 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="the cheap rows with one seed, about an hour on 2 cores (below)")
    parser.add_argument("--max_epochs", type=int, default=0,
                        help="cap every recipe's epochs (separate cells, labelled)")
    parser.add_argument("--pairs", default=os.path.join(ROOT, PAIRS),
                        help="LFW pairs.txt for 10-fold verification of the features rows "
                             "(skipped when missing; default: %(default)s)")
    parser.add_argument("--table", action="store_true",
                        help="only rebuild the tables from the cells already run")
    parser.add_argument("--cell", default="", help=argparse.SUPPRESS)  # model,recipe,proto,seed
    return parser


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cell:
        m, r, p, s = args.cell.split(",")
        run_cell(args.out, m, r, p, int(s), args.pairs, max_epochs=args.max_epochs)
        return 0
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        todo = plan(args)
        lfw = os.environ.get("FACEJAX_LFW", os.path.join(ROOT, "..", "shared", "data", "faces",
                                                         "lfw_aligned"))
        if not os.path.isdir(lfw):
            raise DataError(f"LFW not found at {lfw}: set FACEJAX_LFW to the aligned LFW folder "
                            f"(one sub-folder per person)")
        for i, (m, r, p, s) in enumerate(todo, 1):
            wd = cell_dir(args.out, m, r, p, s, args.max_epochs)
            if os.path.isfile(os.path.join(wd, "cell.json")):
                continue
            print(f"[{i}/{len(todo)}] {p} {m} {r} seed {s}", flush=True)
            os.makedirs(wd, exist_ok=True)
            with open(wd + ".log", "a") as log:
                rc = subprocess.call(
                    [sys.executable, os.path.abspath(__file__), "--cell", f"{m},{r},{p},{s}",
                     "--out", args.out, "--pairs", args.pairs,
                     "--max_epochs", str(args.max_epochs)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            if rc:
                print(f"  failed (exit {rc}); see {wd}.log", flush=True)
    command = "python bench/quality.py " + " ".join(argv)
    write_outputs(args.out, load_cells(args.out), args.md, command.strip())
    print(f"wrote {args.md}")
    return 0


if __name__ == "__main__":
    cli.run(main)
