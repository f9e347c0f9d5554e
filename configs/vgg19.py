"""VGG19 from Keras ImageNet weights,
transfer learning as in the paper (`facejax.config_schema.keras_transfer`).

Inputs are resized to 224 px on the device and normalised as Keras does (caffe: BGR minus
the ImageNet mean):

    python scripts/train.py --config configs/vgg19.py --workdir runs/vgg19 \
        --config.data.root=/path/to/faces

Offline, put vgg19's Keras `_notop.h5` file in $FACEJAX_WEIGHTS (the error names it), or train
from scratch with --config.model.pretrained=''.
"""

from facejax.config_schema import keras_transfer


def get_config():
    return keras_transfer("vgg19")
