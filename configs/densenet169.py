"""DenseNet169 from Keras ImageNet weights, transfer learning as in the paper
(`facejax.config_schema.keras_transfer`).

Inputs are resized to 224 px on the device and normalised as the weights expect (torch: ImageNet
mean/std, as Keras' densenet.preprocess_input):

    python scripts/train.py --config configs/densenet169.py --workdir \
        runs/densenet169 --config.data.root=/path/to/faces

Offline, put `densenet169_weights_tf_dim_ordering_tf_kernels_notop.h5` in $FACEJAX_WEIGHTS or
~/.keras/models (the error names it), or train from scratch with --config.model.pretrained=''. The
torchvision layout: --config.model.weights_source=torchvision (`densenet169-b2777c0a.pth`).
"""

from facejax.config_schema import keras_transfer


def get_config():
    return keras_transfer("densenet169")
