"""MobileNetV2 alpha 0.35 (for small devices: 0.41M backbone parameters) from Keras ImageNet
weights, transfer learning as in the paper (`facejax.config_schema.keras_transfer`).

Inputs are resized to 224 px on the device and normalised as the weights expect (tf: [-1, 1]):

    python scripts/train.py --config configs/mobilenet_v2_035.py --workdir \
        runs/mobilenet_v2_035 --config.data.root=/path/to/faces

Offline, put `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5` in
$FACEJAX_WEIGHTS or ~/.keras/models (the error names it), or train from scratch with
--config.model.pretrained=''.
"""

from facejax.config_schema import keras_transfer


def get_config():
    return keras_transfer("mobilenet_v2_035")
