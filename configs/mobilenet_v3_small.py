"""MobileNetV3-Small from Keras ImageNet weights, transfer learning as in the paper
(`facejax.config_schema.keras_transfer`).

Inputs are resized to 224 px on the device and normalised as the weights expect (tf: [-1, 1], the
map of Keras' built-in Rescaling layer):

    python scripts/train.py --config configs/mobilenet_v3_small.py --workdir \
        runs/mobilenet_v3_small --config.data.root=/path/to/faces

Offline, put `weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5` in $FACEJAX_WEIGHTS or
~/.keras/models (the error names it), or train from scratch with --config.model.pretrained=''. The
torchvision layout: --config.model.weights_source=torchvision (`mobilenet_v3_small-047dcff4.pth`).
"""

from facejax.config_schema import keras_transfer


def get_config():
    return keras_transfer("mobilenet_v3_small")
