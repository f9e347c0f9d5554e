"""ResNet18 (torchvision ImageNet weights) fine-tuned with fastai's fit_one_cycle.

All layers train; the LR follows one cycle (lr/25 -> 1e-3 over the first 25%, then cosine down
to lr/1e5) with Adam's beta1 cycling 0.95 -> 0.85 -> 0.95:

    python scripts/train.py --config configs/resnet18.py --workdir runs/resnet18 \
        --config.data.root=/path/to/faces

The weights (resnet18-f37072fd.pth) come from $FACEJAX_WEIGHTS or the torch hub cache, or are
downloaded once. Find a learning rate first with scripts/lr_find.py and the same flags.
"""

from facejax.config_schema import base


def get_config():
    c = base()
    c.model.name = "resnet18"
    c.model.pretrained = "imagenet"
    c.model.weights_source = "torchvision"
    c.train.schedule = "one_cycle"
    return c
