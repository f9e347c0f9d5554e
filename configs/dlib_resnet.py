"""dlib's face ResNet (128-d, 99.38% LFW) fine-tuned with ArcFace on your identities.

The weights ship in PyPI `face_recognition_models` (the [parity] extra), so this works offline.
Images are cached at 150 px, dlib's chip size; they should be faces aligned like
`dlib.get_face_chip` (eyes level, padding 0.25). The backbone's own 128-d output is the
embedding (no projection), a cosine head learns the classes:

    python scripts/train.py --config configs/dlib_resnet.py --workdir runs/dlib_resnet \
        --config.data.root=../shared/data/faces/lfw_aligned

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
    t.loss = "arcface"
    t.optimizer = "adam"
    t.learning_rate = 1e-4   # small: the descriptor is already good, keep it close
    t.schedule = "cosine"
    t.epochs = 5
    t.batch_size = 64
    # Aligned faces: flips and small jitter only.
    a = c.augment
    a.rotation_deg, a.zoom, a.translate, a.hflip = 5.0, 0.05, 0.05, True
    return c
