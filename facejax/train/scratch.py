"""Training from scratch (`model.pretrained=''`) with a config written for fine-tuning.

Freezing layers keeps what pretrained weights learnt; without pretrained weights the frozen
layers are random, and a run that trains only the last few layers on top of them learns little
(the Keras transfer configs, e.g. configs/resnet50v2.py, freeze all but the last 4). Such a
run trains every layer instead, and says so.
"""

from __future__ import annotations


def frozen_settings(t) -> dict:
    """{setting: value that trains it} for each setting of `config.train` `t` that freezes
    parameters."""
    out = {}
    if t.finetune != "all":
        out["finetune"] = "all"
    if float(t.backbone_lr_mult) == 0.0:
        out["backbone_lr_mult"] = 1.0
    if bool(t.freeze_bn):
        out["freeze_bn"] = False
    return out


def unfreeze_without_weights(config, *, quiet: bool = False) -> dict:
    """With `model.pretrained=''`, sets `config.train` to train every layer (in place) and
    prints what changed; returns the changes ({} when nothing was frozen or weights load)."""
    if config.model.pretrained:
        return {}
    t = config.train
    changes = frozen_settings(t)
    if changes and not quiet:
        was = ", ".join(f"train.{k}={t[k]!r}" for k in changes)
        print(f"note: model.pretrained='' (random initial weights): freezing layers would keep "
              f"them random, so every layer trains ({was} -> "
              + ", ".join(f"{k}={v!r}" for k, v in changes.items()) + ")", flush=True)
    for key, value in changes.items():
        t[key] = value
    return changes
