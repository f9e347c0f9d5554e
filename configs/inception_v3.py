"""InceptionV3 from Keras ImageNet weights, transfer learning as in the paper
(`facejax.config_schema.keras_transfer`).

Inputs are resized to 299 px on the device and normalised as the weights expect (tf: [-1, 1]):

    python scripts/train.py --config configs/inception_v3.py --workdir \
        runs/inception_v3 --config.data.root=/path/to/faces

Offline, put `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5` in $FACEJAX_WEIGHTS or
~/.keras/models (the error names it), or train from scratch with --config.model.pretrained=''. The
torchvision layout: --config.model.weights_source=torchvision (`inception_v3_google-0cc3c7bd.pth`).
"""

from facejax.config_schema import keras_transfer


def get_config():
    return keras_transfer("inception_v3")
