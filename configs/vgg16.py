"""VGG16 (Keras ImageNet weights), transfer learning as the seed: the last 4 layers train.

The seed's Keras recipe: ImageNet weights, the backbone frozen except its last 4 parameterised
layers (facejax/train/optim.py says how layers are counted), a new softmax head, Adam 1e-3,
batch 128, 10 epochs, per-epoch LR decay, early stopping with patience 3. Inputs are resized to
224 px on the device and normalised the Keras way (caffe (BGR, ImageNet mean)):

    python scripts/train.py --config configs/vgg16.py --workdir runs/vgg16 \
        --config.data.root=../shared/data/faces/lfw_aligned

Train everything instead with --config.train.finetune=all (optionally with
--config.train.backbone_lr_mult=0.1); for identities never seen in training use
--config.model.head=cosine --config.train.loss=arcface --config.model.embed_dim=512.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import keras_transfer


def get_config():
    return keras_transfer("vgg16")
