"""What a report says about the run it scores: the model, where its weights came from, which
layers trained, the epochs run, the starting score against the best, the data counts and the
pair verification. Read from the run folder (config.json, metrics.jsonl,
report/verification.json); nothing here imports the training code."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from facejax.rundir import METRICS_JSONL, REPORT_DIR

MONITOR_NAMES = {"val_top1": "validation retrieval Top-1",
                 "val_accuracy": "validation classifier accuracy",
                 "val_loss": "validation loss"}


def weights_line(model_cfg) -> str:
    """Where the starting weights came from."""
    pretrained = str(model_cfg.get("pretrained", "") or "")
    source = str(model_cfg.get("weights_source", "") or "")
    if not pretrained:
        return "random initialisation (trained from scratch)"
    what = "the published pretrained weights" if pretrained == "imagenet" else pretrained
    return what + (f" (weights source: {source})" if source else " (the model's default source)")


def layers_line(train_cfg, epochs_run: int) -> str:
    """Which layers training updated (none when no epoch ran)."""
    if not epochs_run:
        return "none: no epoch ran (the starting model, evaluated as it is)"
    finetune = train_cfg.get("finetune", "all")
    if finetune == "frozen_backbone":
        line = "the head only (backbone frozen)"
    elif finetune == "last_n":
        line = (f"the last {train_cfg.get('trainable_last_n')} backbone layers and the head "
                f"(the rest frozen)")
    else:
        line = "all layers"
    mult = train_cfg.get("backbone_lr_mult", 1.0)
    if mult != 1.0 and finetune != "frozen_backbone":
        line += f", backbone learning rate x{mult}"
    head_init = train_cfg.get("head_init", "random")
    init = "from class means (imprint)" if head_init == "imprint" else "at random"
    return line + f"; head initialised {init}"


def read_history(workdir: str) -> list[dict]:
    """metrics.jsonl's records ([] when missing or unreadable)."""
    try:
        with open(os.path.join(workdir, METRICS_JSONL)) as f:
            return [r for r in (json.loads(line) for line in f if line.strip())
                    if isinstance(r, dict)]
    except (OSError, ValueError):
        return []


def training_facts(history: list[dict], monitor: str, planned_epochs) -> dict:
    """Epochs run, and the monitored score at the start (epoch 0, when scored) and at best."""
    epochs = max((int(r.get("epoch", 0)) for r in history), default=0)
    start = next((r for r in history if r.get("epoch") == 0), None)
    best = [r for r in history if r.get("best")]
    out: dict[str, Any] = dict(epochs_run=epochs, epochs_planned=planned_epochs, monitor=monitor)
    if start is not None and start.get(monitor) is not None:
        out["start_score"] = float(start[monitor])
    if best and best[-1].get(monitor) is not None:
        out["best_score"] = float(best[-1][monitor])
        out["best_epoch"] = int(best[-1].get("epoch", 0))
    return out


def describe_run(workdir: str, config, data) -> dict:
    """The facts the report's "The run" section shows (JSON-ready)."""
    facts = training_facts(read_history(workdir), config.train.get("monitor", "val_top1"),
                           config.train.get("epochs"))
    from facejax.retrieval.verify_run import calibrated_threshold

    gallery = data.query if data.gallery is None else data.gallery
    used = np.unique(np.concatenate([s.indices for s in (data.train, data.val, data.query,
                                                          gallery)]))
    threshold, source = calibrated_threshold(workdir)
    return dict(
        same_person_threshold=threshold, threshold_source=source,
        weights=weights_line(config.model),
        trained_layers=layers_line(config.train, facts["epochs_run"]),
        training=facts,
        data=dict(images=len(data.paths), training_classes=int(data.num_classes),
                  train=len(data.train), val=len(data.val), queries=len(data.query),
                  gallery=len(gallery), leave_one_out=data.gallery is None,
                  unused=len(data.paths) - len(used)))


def read_verification(workdir: str) -> dict | None:
    """The run's report/verification.json (None when missing or unreadable)."""
    try:
        with open(os.path.join(workdir, REPORT_DIR, "verification.json")) as f:
            result = json.load(f)
        return result if isinstance(result, dict) and "accuracy" in result else None
    except (OSError, ValueError):
        return None


def _score(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def run_lines(run: Mapping[str, Any]) -> list[str]:
    """The "The run" section as Markdown list items ([] for results without run facts)."""
    if not run or "training" not in run:
        return []
    t, d = run["training"], run["data"]
    name = MONITOR_NAMES.get(t["monitor"], t["monitor"])
    epochs = f"{t['epochs_run']}"
    if t.get("epochs_planned") is not None and t["epochs_planned"] != t["epochs_run"]:
        epochs += f" of {t['epochs_planned']} planned (stopped early)"
    lines = [f"- Model: `{run.get('model')}`",
             f"- Weights: {run['weights']}",
             f"- Layers trained: {run['trained_layers']}",
             f"- Epochs run: {epochs}"]
    if "best_score" in t:
        start = (f"{_score(t.get('start_score'))} at the start (epoch 0)"
                 if "start_score" in t else "not scored at the start (random initialisation)")
        verdict = ""
        if "start_score" in t and t["epochs_run"]:
            verdict = ("; no epoch beat the starting point, which was kept"
                       if t["best_epoch"] == 0 else
                       f"; {t['best_score'] - t['start_score']:+.4f} over the start")
        lines.append(f"- {name[0].upper() + name[1:]}: {start}; best {_score(t['best_score'])} "
                     f"at epoch {t['best_epoch']} (the exported model){verdict}")
    if run.get("same_person_threshold") is not None:
        lines.append(f"- Same-person threshold: {run['same_person_threshold']:.4f} (calibrated "
                     f"by pair verification, {run['threshold_source']}): search.py and the "
                     f"service mark results below it 'no match'")
    g = "leave-one-out over the queries" if d["leave_one_out"] else f"{d['gallery']} images"
    lines.append(f"- Data: {d['images']} images, {d['training_classes']} training classes; train "
                 f"{d['train']}, validation {d['val']}, queries {d['queries']}, gallery {g}"
                 + (f"; {d['unused']} images in none of these (classes too small to split)"
                    if d.get("unused") else ""))
    return lines


def verification_line(result: Mapping[str, Any] | None) -> str:
    """The run's pair verification in one Markdown line ('' when it has none)."""
    if not result:
        return ""
    from facejax.retrieval.verify_run import markdown_line

    try:
        return markdown_line(result)
    except (KeyError, TypeError, ValueError):
        return ""
