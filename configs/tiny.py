"""Tiny: a few steps of the scratch CNN at 24 px on a small idx dataset (tests and smoke runs).

    python scripts/train.py --config configs/tiny.py --workdir /tmp/tiny \
        --config.data.root=/path/to/idx_folder
"""

from facejax.config_schema import base


def get_config():
    c = base()
    c.data.source = "idx"
    c.data.image_size = 24
    c.data.val_fraction = 0.25
    c.data.decode_workers = 1
    c.model.name = "scratch_cnn"
    c.model.input_size = 24
    c.train.batch_size = 16
    c.train.epochs = 2
    c.train.compute_dtype = "float32"
    c.train.monitor = "val_accuracy"
    c.train.log_every_steps = 2
    return c
