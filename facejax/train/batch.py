"""Fit `train.batch_size` to a training set smaller than one batch (small first folders).

The configs keep the paper's batch of 128 (64 for faces); a 200-image folder holds ~127 training
images after the validation and test splits, which used to stop the run before anything was
learnt — even with `train.epochs=0`, where no training batch is ever drawn. Instead the batch
becomes the largest power of two that fits (a multiple of the device count), with a notice.
"""

from __future__ import annotations

from facejax.errors import DataError


def fitting_batch_size(batch_size: int, num_train: int, num_devices: int = 1) -> int:
    """`batch_size`, or when the training set is smaller, the largest power of two not above
    `num_train` that is a multiple of `num_devices` (else the largest such multiple)."""
    batch_size, num_train, num_devices = int(batch_size), int(num_train), max(1, int(num_devices))
    if num_train >= batch_size:
        return batch_size
    if num_train < num_devices:
        raise DataError(f"only {num_train} training images, fewer than the {num_devices} "
                        "devices that each need one per batch; add images or use fewer devices "
                        "(on a CPU: JAX_NUM_CPU_DEVICES=1)")
    fit = 1 << (num_train.bit_length() - 1)  # largest power of two <= num_train
    if fit % num_devices:
        fit = num_train // num_devices * num_devices
    return fit


def fit_batch_to_data(config, num_train: int, num_devices: int = 1, *, quiet: bool = False) -> int:
    """Lowers `config.train.batch_size` in place when the training split is smaller than one
    batch, and prints what it did; returns the batch size used. Deterministic in the data, so
    a resumed run (same data) finds the same batch as the run it resumes."""
    want = int(config.train.batch_size)
    got = fitting_batch_size(want, num_train, num_devices)
    if got != want:
        config.train.batch_size = got
        if not quiet:
            print(f"note: only {num_train} training images, fewer than one batch of {want}: "
                  f"using train.batch_size={got} (set --config.train.batch_size to choose)",
                  flush=True)
    return got
