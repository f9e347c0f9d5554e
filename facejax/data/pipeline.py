"""grain train iterator over the uint8 cache, padded eval batches, 'data'-sharded global arrays."""

from __future__ import annotations

import mmap
import zlib
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from facejax.children import ExitWithParent
from facejax.errors import CheckpointError, ConfigError, DataError
from facejax.sharding import DATA_AXIS, data_sharded

_STATE_VERSION = 1


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax.Arrays split along the batch over mesh axis 'data'.

    Every process passes its own consecutive slice of the global batch (as the train iterator
    and `eval_batches` yield); the global batch must divide evenly over the 'data' devices.
    """
    n_data = mesh.shape[DATA_AXIS]
    sharding = data_sharded(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % n_data:
            raise ConfigError(
                f"global batch of {global_rows} ({key!r}) does not split over the {n_data} devices "
                f"of the '{DATA_AXIS}' axis; use a batch size that is a multiple of {n_data}")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


class _ArrayRef:
    """Holds the image array; pickles a memory-mapped .npy by path, so workers do not copy it."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __getstate__(self):
        a = self.array
        # Only a whole-file np.memmap (as np.load(mmap_mode='r') returns) can be reopened by path.
        if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.flags.c_contiguous:
            return {"path": a.filename, "dtype": a.dtype.str, "shape": a.shape, "offset": a.offset}
        return {"array": np.asarray(a)}

    def __setstate__(self, state):
        if "array" in state:
            self.array = state["array"]
        else:
            self.array = np.memmap(state["path"], np.dtype(state["dtype"]), "r",
                                   state["offset"], tuple(state["shape"]))


class _LoadLocalBatch(grain.transforms.Map):
    """Global batch of positions -> this process's slice as dict(image, label)."""

    def __init__(self, images: _ArrayRef, indices, labels, lo: int, hi: int):
        self._images, self._indices, self._labels = images, indices, labels
        self._lo, self._hi = lo, hi

    def map(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        local = np.asarray(positions)[self._lo:self._hi]
        rows = self._indices[local]
        # Read the memory map in file order (fewer page faults), then restore the batch order.
        order = np.argsort(rows, kind="stable")
        images = np.empty((len(rows),) + self._images.array.shape[1:], np.uint8)
        images[order] = self._images.array[rows[order]]
        return {"image": images, "label": self._labels[local]}


def _check_subset(images, indices, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[-1] != 3:
        raise DataError(f"images must be a uint8 numpy array [N,S,S,3], got "
                        f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                        f"{getattr(images, 'shape', '')}")
    indices = np.asarray(indices, np.int64)
    if indices.ndim != 1:
        raise DataError(f"indices must be 1-D, got shape {indices.shape}")
    if len(indices) and (indices.min() < 0 or indices.max() >= len(images)):
        raise DataError(f"indices out of range for {len(images)} images "
                        f"(min {indices.min()}, max {indices.max()})")
    if labels is not None:
        labels = np.asarray(labels, np.int32)
        if labels.shape != indices.shape:
            raise DataError(f"labels {labels.shape} and indices {indices.shape} must match")
    return indices, labels


class TrainIterator(grain.DatasetIterator):
    """Endless, seeded, checkpointable train batches for this process.

    Batch k is `dict(image=uint8[b,S,S,3], label=int32[b])`: this process's consecutive slice of
    global batch k. Each epoch is a fresh shuffle (grain folds the epoch into the seed), the last
    partial batch is dropped, and the order depends only on (seed, data, batch size), never on the
    number of workers. `get_state()` is a small JSON dict; `set_state()` resumes exactly.
    Because this is a grain DatasetIterator, orbax can save it with
    `grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore(iterator)`.

    It is a grain iterator with no parents that holds its pipeline's iterator (`_it`): a
    restore closes that and opens the index-addressed dataset at the saved step, through
    grain's public calls only (MapDataset slicing, `to_iter_dataset`, `iter`, `close`).
    """

    _it = None  # until __init__ opens it: a constructor that raised has nothing to close

    def __init__(self, images: np.ndarray, indices, labels, *, batch_size: int, seed: int,
                 workers: int = 0, process_index: int | None = None,
                 process_count: int | None = None, prefetch: int = 4):
        super().__init__()  # first: grain's __del__ closes even an iterator whose checks failed
        indices, labels = _check_subset(images, indices, labels)
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size <= 0 or batch_size % self.process_count:
            raise ConfigError(f"train.batch_size ({batch_size}) must be a positive multiple of "
                              f"the process count ({self.process_count})")
        if len(indices) < batch_size:
            raise DataError(f"only {len(indices)} training images, fewer than one batch of "
                            f"{batch_size}; lower train.batch_size")
        if workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {workers}")
        if not 0 <= seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // self.process_count
        self.steps_per_epoch = len(indices) // batch_size
        self.workers, self.prefetch, self.seed = workers, prefetch, seed
        lo = self.process_index * self.local_batch_size
        load = _LoadLocalBatch(_ArrayRef(images), indices, labels, lo, lo + self.local_batch_size)
        self._dataset = (
            grain.MapDataset.range(len(indices))
            .shuffle(seed=seed)
            .batch(batch_size, drop_remainder=True)
            .repeat(None)
            .map(load))
        self._spec = {"num_examples": len(indices), "batch_size": batch_size, "seed": seed,
                      "process_count": self.process_count,
                      "fingerprint": zlib.crc32(indices.tobytes() + labels.tobytes())}
        self._step = 0
        self._it = self._open(0)

    def _open(self, step: int) -> grain.DatasetIterator:
        # Slicing the index-addressed MapDataset makes resuming O(1) and worker-count independent.
        ds = self._dataset[step:].to_iter_dataset(
            grain.ReadOptions(num_threads=2, prefetch_buffer_size=self.prefetch))
        if self.workers:
            # grain 0.2.18 workers read absl flags; outside absl.app.run nothing parsed them.
            from absl import flags
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=self.prefetch),
                worker_init_fn=ExitWithParent())
        return iter(ds)

    @property
    def step(self) -> int:
        """Global batches produced so far (the index of the next batch)."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise ValueError("Trying to advance a closed iterator: the train iterator.")
        batch = next(self._it)
        self._step += 1
        return batch

    def start_prefetch(self) -> None:
        """grain's hook (its orbax handler calls it after a restore): starts reading ahead."""
        if self._it is not None:
            self._it.start_prefetch()

    def close(self) -> None:
        """Stops the pipeline (and its worker processes); idempotent, as in grain."""
        it, self._it = self._it, None
        if it is not None:
            it.close()
        super().close()

    def get_state(self) -> dict[str, Any]:
        return dict(version=_STATE_VERSION, step=self._step, **self._spec)

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise CheckpointError(f"unrecognised data-iterator state: {state!r}")
        for key, value in self._spec.items():
            if state.get(key) != value:
                raise CheckpointError(
                    f"data-iterator checkpoint does not match this data: {key} was "
                    f"{state.get(key)!r}, now {value!r} (changed dataset, seed or batch size?)")
        if self._it is None:
            raise ValueError("cannot restore a closed train iterator")
        self._it.close()
        self._step = int(state["step"])
        self._it = self._open(self._step)


def create_train_iterator(images: np.ndarray, subset, config) -> TrainIterator:
    """The train iterator for `subset` (`.indices`, `.labels`) from `config.train`/`config.data`."""
    return TrainIterator(images, subset.indices, subset.labels, batch_size=config.train.batch_size,
                         seed=config.seed, workers=config.data.workers)


def eval_batches(images: np.ndarray, indices, batch_size: int, mesh: Mesh | None = None,
                 labels: np.ndarray | None = None) -> Iterator[dict[str, Any]]:
    """Yields `images[indices]` in order as fixed-shape batches `dict(image, mask[, label])`.

    The global batch is `batch_size` rounded up to a multiple of the device count, and the last
    batch is zero-padded with `mask` False, so one compiled function serves every batch. Each
    process gets its slice; with `mesh` the batches are global jax.Arrays (`to_global`),
    otherwise numpy. Concatenating outputs and keeping `mask` rows restores `indices` order;
    globally the valid rows of each batch are its first `min(size, remaining)` rows.
    `labels` (aligned with `indices`) adds a zero-padded `label` entry.
    """
    indices, _ = _check_subset(images, indices)
    n_dev = mesh.devices.size if mesh is not None else jax.device_count()
    if batch_size <= 0:
        raise ConfigError(f"eval batch size must be positive, got {batch_size}")
    size = -(-batch_size // n_dev) * n_dev
    pc = jax.process_count()
    local = size // pc
    lo = jax.process_index() * local
    for start in range(0, len(indices), size):
        rows = indices[start:start + size][lo:lo + local]
        image = np.zeros((local,) + images.shape[1:], np.uint8)
        image[:len(rows)] = images[rows]
        mask = np.arange(local) < len(rows)
        batch = {"image": image, "mask": mask}
        if labels is not None:
            label = np.zeros((local,), np.int32)
            label[:len(rows)] = labels[start:start + size][lo:lo + local]
            batch["label"] = label
        yield to_global(batch, mesh) if mesh is not None else batch
