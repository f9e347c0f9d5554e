"""Run by test_pipeline.py in a subprocess: sharded batches on 8 fake CPU devices."""

import os

# Must be set before jax is imported: it fixes the number of host devices for the process.
_FLAG = "--xla_force_host_platform_device_count=8"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np

from facejax import sharding
from facejax.data import pipeline
from facejax.errors import ConfigError


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_data_mesh()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 6, 6, 3), dtype=np.uint8)
    indices = np.arange(1, 50)
    labels = np.arange(49, dtype=np.int32)

    it = pipeline.TrainIterator(images, indices, labels, batch_size=16, seed=3)
    host = next(it)
    batch = pipeline.to_global(host, mesh)
    for key in ("image", "label"):
        arr = batch[key]
        assert arr.shape[0] == 16, arr.shape
        assert len(arr.sharding.device_set) == 8, arr.sharding
        assert arr.sharding.spec == jax.sharding.PartitionSpec("data"), arr.sharding.spec
        assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
        np.testing.assert_array_equal(np.asarray(arr), host[key])
    # A jitted reduction over the sharded batch sees the whole global batch.
    total = jax.jit(lambda x: x.astype(np.int32).sum())(batch["image"])
    assert int(total) == int(host["image"].astype(np.int64).sum())

    try:
        pipeline.to_global({"image": host["image"][:12]}, mesh)
    except ConfigError as e:
        assert "multiple of 8" in str(e), e
    else:
        raise AssertionError("a batch of 12 over 8 devices must raise ConfigError")

    # Eval batches: 13 images, batch 10 -> padded to 16 (a multiple of 8 devices), one batch.
    order = np.array([5, 3, 9, 0, 1, 2, 4, 6, 7, 8, 10, 11, 12])
    out = list(pipeline.eval_batches(images, order, 10, mesh))
    assert len(out) == 1
    image, mask = out[0]["image"], out[0]["mask"]
    assert image.shape == (16, 6, 6, 3) and len(image.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(mask), np.arange(16) < 13)
    np.testing.assert_array_equal(np.asarray(image)[:13], images[order])
    assert not np.asarray(image)[13:].any()
    print("OK")


if __name__ == "__main__":
    main()
