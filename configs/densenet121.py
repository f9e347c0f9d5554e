"""DenseNet121 from Keras ImageNet weights, transfer learning as in the paper
(`facejax.config_schema.keras_transfer`).

Inputs are resized to 224 px on the device and normalised as the weights expect (torch: ImageNet
mean/std, as Keras' densenet.preprocess_input):

    python scripts/train.py --config configs/densenet121.py --workdir \
        runs/densenet121 --config.data.root=/path/to/faces

Offline, put `densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5` in $FACEJAX_WEIGHTS or
~/.keras/models (the error names it), or train from scratch with --config.model.pretrained=''. The
torchvision layout: --config.model.weights_source=torchvision (`densenet121-a639ec97.pth`).
"""

from facejax.config_schema import keras_transfer


def get_config():
    return keras_transfer("densenet121")
