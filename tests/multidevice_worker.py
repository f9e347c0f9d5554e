"""Subprocess for test_multidevice.py: a few train steps on fake CPU devices, params to .npz.

  python multidevice_worker.py single OUT.npz            (needs 8 devices: trains on 8, then 1)
  python multidevice_worker.py multi OUT.npz ADDR N ID   (one of N processes of a job)

The device count comes from XLA_FLAGS, set by the test before this process imports jax.
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, BATCH, SIZE, CLASSES = 3, 16, 24, 4


def synthetic_data():
    """The same images and labels in every process (seeded)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, 64).astype(np.int32)
    images = rng.integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8)
    images[np.arange(64), :, :, labels % 3] = 255  # a learnable colour cue
    return images, labels


def train(devices):
    """STEPS steps of the tiny config on a 'data' mesh over `devices`; returns (params, losses)."""
    import jax

    from facejax.config import load_config
    from facejax.data.pipeline import TrainIterator, to_global
    from facejax.sharding import make_data_mesh
    from facejax.train import state as state_lib
    from facejax.train.losses import LossConfig
    from facejax.train.mesh import replicate
    from facejax.train.step import jit_train_step

    # SGD, not Adam: Adam's first steps are ~lr * sign(grad), which turns float noise in tiny
    # gradients into lr-sized differences; SGD keeps differences proportional to the noise.
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "tiny.py"),
        ["train.optimizer=sgd", "train.learning_rate=0.05", "model.dropout=0.2"])
    images, labels = synthetic_data()
    mesh = make_data_mesh(devices)
    model = state_lib.build_model(config, CLASSES)
    state, bundle, tx, _ = state_lib.create_train_state(config, model, steps_per_epoch=4,
                                                        total_steps=STEPS)
    state = replicate(state, mesh)
    key = replicate(jax.random.key_data(jax.random.key(0)), mesh)
    fn = jit_train_step(mesh, bundle=bundle, tx=tx, loss_cfg=LossConfig.from_config(config),
                        augment_cfg=config.augment, freeze_bn=False)
    it = TrainIterator(images, np.arange(len(images)), labels, batch_size=BATCH, seed=0)
    losses = []
    for _ in range(STEPS):
        state, metrics = fn(state, to_global(next(it), mesh), key)
        losses.append(float(metrics["loss"]))
    params = _flat(jax.device_get(state.params), "params/")
    stats = _flat(jax.device_get(state.batch_stats), "stats/")
    return {**params, **stats}, np.array(losses)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "multi":
        import jax
        addr, num, pid = sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        jax.distributed.initialize(addr, num, pid)
        assert jax.process_count() == num and jax.device_count() == 4 * num, jax.devices()
        params, losses = train(jax.devices())
        if pid == 0:
            np.savez(out, losses=losses, **params)
        return
    import jax
    assert jax.device_count() == 8, jax.devices()
    p8, l8 = train(jax.devices())
    p1, l1 = train(jax.devices()[:1])
    np.savez(out, losses8=l8, losses1=l1, **{f"d8/{k}": v for k, v in p8.items()},
             **{f"d1/{k}": v for k, v in p1.items()})


if __name__ == "__main__":
    main()
