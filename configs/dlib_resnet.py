"""dlib's face ResNet (128-d, 99.38% LFW) fine-tuned with ArcFace on your identities.

The weights ship in PyPI `face_recognition_models` (the [parity] extra), so this works offline.
Images are cached at 150 px, dlib's chip size; they should be faces aligned like
`dlib.get_face_chip` (eyes level, padding 0.25). The backbone's own 128-d output is the
embedding (no projection), a cosine head learns the classes:

    python scripts/train.py --config configs/dlib_resnet.py --workdir runs/dlib_resnet \
        --config.data.root=/path/to/faces

Score the pretrained descriptor without training with --config.train.epochs=0.
"""

from facejax.config_schema import base


def get_config():
    c = base()
    c.data.image_size = 150
    c.model.name = "dlib_resnet"
    c.model.pretrained = "imagenet"   # = the preset's weights (here dlib's, not ImageNet)
    c.model.weights_source = "dlib"
    c.model.embed_dim = 0
    c.model.l2_normalize = True
    c.model.head = "cosine"
    t = c.train
    # A gentle recipe, measured on small folders (bench/face_recipe.py, QUALITY.md): the cosine
    # head starts at the class means (imprinting), BatchNorm keeps dlib's statistics, and the
    # backbone learns at a tenth of the head's rate for 3 short epochs. The old recipe (a random
    # head, the whole network at Adam 1e-4 for 5 epochs) took 20 LFW people's val Top-1 from 1.00
    # to 0.37. Epoch 0 (the untrained model) is a candidate for "best", so a run that does not
    # beat it keeps it and says so. Validation Top-1 of a good face model on a small folder is
    # often 1.00 from the start, so no epoch could beat it: mAP@R picks the best epoch instead.
    t.monitor = "val_map_r"
    t.loss = "arcface"
    t.head_init = "imprint"
    t.freeze_bn = True
    t.optimizer = "adamw"
    t.weight_decay = 5e-4
    t.learning_rate = 1e-4
    t.backbone_lr_mult = 0.1
    t.schedule = "cosine"
    t.warmup_epochs = 0.5
    t.epochs = 3
    t.batch_size = 64
    # Aligned faces: flips and small jitter only.
    a = c.augment
    a.rotation_deg, a.zoom, a.translate, a.hflip = 5.0, 0.05, 0.05, True
    return c
