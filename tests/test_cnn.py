"""ScratchCNN: the seed's Table 1 counts, its Keras equivalent, and other input sizes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.merge import assign_weights, flatten, model_weights
from facejax.errors import ConfigError
from facejax.models import create_model, get_preset


def _count(model, kind) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, kind)))


def test_seed_table1_parameter_counts():
    model = nnx.eval_shape(lambda: create_model("scratch_cnn", num_classes=98, rngs=nnx.Rngs(0)))
    assert _count(model, nnx.BatchStat) == 448          # BN moving mean/var: not trained
    assert _count(model, nnx.Param) == 2_746_178
    assert _count(model, nnx.Param) + _count(model, nnx.BatchStat) == 2_746_626
    shapes = {k: v.shape for k, v in flatten(model_weights(model)).items()
              if k.endswith("kernel")}
    assert shapes == {
        "backbone/block1_conv1/kernel": (3, 3, 3, 32),
        "backbone/block1_conv2/kernel": (3, 3, 32, 32),
        "backbone/block2_conv1/kernel": (3, 3, 32, 64),
        "backbone/block2_conv2/kernel": (3, 3, 64, 64),
        "backbone/block3_conv1/kernel": (3, 3, 64, 128),
        "backbone/block3_conv2/kernel": (3, 3, 128, 128),
        "head/kernel": (14 * 14 * 128, 98),
    }
    assert get_preset("scratch_cnn").input_size == 128


def _numpy(layer) -> list[np.ndarray]:
    return [np.asarray(w.value) for w in layer.weights]  # Keras' own order: kernel, bias / BN


@pytest.mark.slow
@pytest.mark.parity
def test_matches_the_seed_keras_model():
    """The same layers in Keras (the seed's framework) give the same count and outputs."""
    try:
        import keras
        from keras import layers
    except ImportError:
        pytest.fail("keras is missing: pip install -e '.[parity]'")

    k = keras.Sequential([keras.Input((128, 128, 3))])
    for f in (32, 64, 128):
        k.add(layers.Conv2D(f, 3, padding="same", activation="relu"))
        k.add(layers.BatchNormalization())
        k.add(layers.Conv2D(f, 3, padding="valid", activation="relu"))
        k.add(layers.MaxPooling2D(2))
    k.add(layers.Flatten())
    k.add(layers.Dense(98))
    assert k.count_params() == 2_746_626

    # Keras' weights (with random BN statistics) become ours, layer by layer, by name.
    rng = np.random.default_rng(0)
    tree = {"backbone": {}}
    convs = [layer for layer in k.layers if isinstance(layer, layers.Conv2D)]
    bns = [layer for layer in k.layers if isinstance(layer, layers.BatchNormalization)]
    for i, bn in enumerate(bns):
        n = bn.gamma.shape[0]
        stats = [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                 rng.uniform(0.5, 1.5, n)]
        bn.set_weights([s.astype(np.float32) for s in stats])
        tree["backbone"][f"block{i + 1}_bn"] = dict(zip(("scale", "bias", "mean", "var"),
                                                        _numpy(bn)))
    for i, conv in enumerate(convs):
        kernel, bias = _numpy(conv)
        tree["backbone"][f"block{i // 2 + 1}_conv{i % 2 + 1}"] = {"kernel": kernel, "bias": bias}
    kernel, bias = _numpy(k.layers[-1])
    tree["head"] = {"kernel": kernel, "bias": bias}
    model = nnx.eval_shape(lambda: create_model("scratch_cnn", num_classes=98, rngs=nnx.Rngs(1)))
    assign_weights(model, tree)  # complete: every parameter and statistic comes from Keras

    x = rng.uniform(0, 1, (2, 128, 128, 3)).astype(np.float32)
    want = np.asarray(k(x, training=False))
    got = np.asarray(model(jnp.asarray(x)))
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


@pytest.fixture(scope="module")
def small():
    """A 32px, 4-class model with dropout 0.5 before its Dense."""
    return create_model("scratch_cnn", num_classes=4, rngs=nnx.Rngs(0), input_size=32,
                        dropout=0.5)


@pytest.mark.slow
def test_other_input_sizes_and_errors(small):
    # 32 -> 30 -> 15 -> 13 -> 6 -> 4 -> 2: 2 * 2 * 128 flatten features
    assert small.backbone.num_features == 512
    x = jnp.ones((3, 32, 32, 3))
    assert nnx.eval_shape(lambda m, v: m.features(v), small, x).shape == (3, 512)
    assert nnx.eval_shape(lambda m, v: m(v), small, x).shape == (3, 4)
    with pytest.raises(ConfigError, match="built for 32px"):
        nnx.eval_shape(lambda m, v: m(v), small, jnp.ones((1, 64, 64, 3)))
    with pytest.raises(ConfigError, match="too small"):
        create_model("scratch_cnn", num_classes=5, rngs=nnx.Rngs(0), input_size=16)


@pytest.mark.slow
def test_train_mode_dropout_and_batch_stats(small):
    fwd = nnx.jit(lambda m, v, train: m(v, train=train), static_argnums=2)
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
    mean0 = np.asarray(small.backbone.block1_bn.mean[...])
    np.testing.assert_array_equal(fwd(small, x, False), fwd(small, x, False))  # deterministic
    np.testing.assert_array_equal(small.backbone.block1_bn.mean[...], mean0)
    a, b = fwd(small, x, True), fwd(small, x, True)               # dropout before the Dense
    assert not np.allclose(a, b)
    assert not np.allclose(small.backbone.block1_bn.mean[...], mean0)  # BN stats updated


def test_batchnorm_momentum_is_an_architecture_argument():
    from facejax.models.cnn import BN_MOMENTUM

    def momenta(model):
        return {getattr(model.backbone, f"block{i}_bn").momentum for i in (1, 2, 3)}

    default = nnx.eval_shape(lambda: create_model("scratch_cnn", num_classes=2,
                                                  rngs=nnx.Rngs(0), input_size=32))
    assert momenta(default) == {BN_MOMENTUM} and BN_MOMENTUM == 0.9
    keras_like = nnx.eval_shape(lambda: create_model("scratch_cnn", num_classes=2,
                                                     rngs=nnx.Rngs(0), input_size=32,
                                                     bn_momentum=0.99))
    assert momenta(keras_like) == {0.99}
    with pytest.raises(ConfigError, match=r"bn_momentum must be in \[0, 1\)"):
        create_model("scratch_cnn", num_classes=2, rngs=nnx.Rngs(0), input_size=32,
                     bn_momentum=1.5)
