"""Parity: Keras applications (JAX backend) with random weights and BN stats == our models."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # conftest sets it too; keras reads it on import

import h5py
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import LazyModule
from flax import nnx

try:
    keras = LazyModule("keras")  # imported by the first test that uses it
except ImportError as e:  # CI installs [parity]; a missing extra must fail, not skip
    raise ImportError(f"parity tests need the [parity] extra (pip install -e '.[parity]'): {e}")

from facejax.convert import keras_h5
from facejax.convert.merge import flatten, load_weights
from facejax.errors import WeightsError
from facejax.models import create_model

# Keras' own numpy-2 `__array__` deprecation noise, ~1000 lines per run.
pytestmark = [pytest.mark.parity, pytest.mark.filterwarnings("ignore::DeprecationWarning:keras")]
TOL = 1e-4


def rel_err(a, b) -> float:
    """max|a - b| / max|b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def reference(name: str, size: int, features_layer: str, seed: int, **kw):
    """A Keras application with random weights, biases and BN moving statistics.

    Returns (model, model_with_two_outputs) where the second gives (output, pooled features).
    """
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), **kw)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.3, 0.3, n),
                               rng.normal(0.0, 0.3, n), rng.uniform(0.5, 2.0, n)])
        elif getattr(layer, "bias", None) is not None:  # Conv2D/Dense biases init to zero
            layer.bias.assign(rng.uniform(-0.1, 0.1, layer.bias.shape))
    outputs = [model.output, model.get_layer(features_layer).output]
    return model, keras.Model(model.input, outputs)


def write_legacy_h5(model, path) -> None:
    """The Keras 2 `save_weights` layout of the real downloadable ImageNet files: root attr
    `layer_names`, per-layer attr `weight_names` ('conv1_conv/kernel:0'), bytes strings."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            g = f.create_group(layer.name)
            names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = [n.encode() for n in names]
            for n, w in zip(names, layer.weights):
                g.create_dataset(n, data=np.asarray(w.numpy()))


def ours(name: str, tree, source: str) -> nnx.Module:
    # Built abstractly (no random init) and filled entirely from the converted weights.
    model = nnx.eval_shape(
        lambda: create_model(name, num_classes=1000, rngs=nnx.Rngs(0), source=source))
    return load_weights(model, tree)


@nnx.jit
def forward(model, x):
    return model(x), model.features(x)


def param_and_stat_count(model) -> int:
    return sum(int(np.prod(v.shape)) for _, v in
               nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


@pytest.fixture(scope="module")
def resnet50_ref():
    return reference("ResNet50", 64, "avg_pool", seed=0, classifier_activation=None)


@pytest.mark.slow
def test_resnet50_parity_keras3_weights(resnet50_ref, tmp_path):
    ref, both = resnet50_ref
    path = tmp_path / "resnet50.weights.h5"
    ref.save_weights(str(path))
    x = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits, feats = (np.asarray(a) for a in both(x, training=False))
    model = ours("resnet50", keras_h5.convert_file(path), source="keras")
    got_logits, got_feats = forward(model, jnp.asarray(x))
    assert rel_err(got_logits, logits) <= TOL
    assert rel_err(got_feats, feats) <= TOL


@pytest.mark.slow
def test_resnet50_legacy_h5_converts_identically(resnet50_ref, tmp_path):
    ref, _ = resnet50_ref
    ref.save_weights(str(tmp_path / "new.weights.h5"))
    write_legacy_h5(ref, tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5")
    new = flatten(keras_h5.convert_file(tmp_path / "new.weights.h5"))
    old = flatten(keras_h5.convert_file(
        tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"))
    # 53 convs (kernel + bias), 53 BatchNorms (4 each), the Dense head (kernel + bias).
    assert new.keys() == old.keys() and len(new) == 53 * 2 + 53 * 4 + 2
    for k in new:
        np.testing.assert_array_equal(new[k], old[k])
    # Keras counts BN moving statistics as (non-trainable) params: compare Param + BatchStat.
    model = nnx.eval_shape(lambda: create_model("resnet50", num_classes=1000,
                                                rngs=nnx.Rngs(0), source="keras"))
    assert param_and_stat_count(model) == ref.count_params() == 25_636_712


@pytest.mark.slow
def test_resnet50v2_parity(tmp_path):
    ref, both = reference("ResNet50V2", 64, "avg_pool", seed=2, classifier_activation=None)
    path = tmp_path / "resnet50v2.weights.h5"
    ref.save_weights(str(path))
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
    logits, feats = (np.asarray(a) for a in both(x, training=False))
    model = ours("resnet50v2", keras_h5.convert_file(path), source="keras")
    got_logits, got_feats = forward(model, jnp.asarray(x))
    assert rel_err(got_logits, logits) <= TOL
    assert rel_err(got_feats, feats) <= TOL
    assert param_and_stat_count(model) == ref.count_params() == 25_613_800


@pytest.mark.slow
def test_vgg19_parity_with_top_224(tmp_path):
    # The Keras classifier flattens a 7x7 map, so the top needs 224 px; our adaptive pool is
    # then the identity and fc1 takes Keras' NHWC flatten order unchanged.
    ref, both = reference("VGG19", 224, "fc2", seed=4, classifier_activation=None)
    path = tmp_path / "vgg19.weights.h5"
    ref.save_weights(str(path))
    x = np.random.default_rng(5).normal(size=(2, 224, 224, 3)).astype(np.float32)
    logits, feats = (np.asarray(a) for a in both(x, training=False))
    model = ours("vgg19", keras_h5.convert_file(path), source="keras")
    got_logits, got_feats = forward(model, jnp.asarray(x))
    assert rel_err(got_logits, logits) <= TOL
    assert rel_err(got_feats, feats) <= TOL
    assert param_and_stat_count(model) == ref.count_params() == 143_667_240


@pytest.mark.slow
def test_vgg16_notop_parity_legacy_h5(tmp_path):
    # A notop file has no fc1/fc2/predictions: features are the global-average-pooled conv map
    # (Keras pooling='avg'). Training would keep the head's initial value via dont_load
    # (test_merge.py); here a zero head keeps the model abstract, skipping a slow random init.
    ref, _ = reference("VGG16", 64, "block5_pool", seed=6, include_top=False, pooling="avg")
    path = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_legacy_h5(ref, path)
    x = np.random.default_rng(7).normal(size=(2, 64, 64, 3)).astype(np.float32)
    feats = np.asarray(ref(x, training=False))
    tree = keras_h5.convert_file(path)
    assert "head" not in tree and "fc1" not in tree["backbone"]
    tree["head"] = {"kernel": np.zeros((512, 1000), np.float32),
                    "bias": np.zeros((1000,), np.float32)}
    model = ours("vgg16", tree, source="keras_notop")
    logits, got_feats = forward(model, jnp.asarray(x))
    assert rel_err(got_feats, feats) <= TOL
    assert logits.shape == (2, 1000)


def test_full_model_h5_wrapper_and_errors(tmp_path):
    # Keras 2 `model.save('x.h5')` nests the same layout under 'model_weights'.
    path = tmp_path / "full.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("model_weights")
        g.attrs["layer_names"] = [b"predictions", b"flatten"]
        g.create_group("flatten").attrs["weight_names"] = []
        p = g.create_group("predictions")
        p.attrs["weight_names"] = [b"predictions/kernel:0", b"predictions/bias:0"]
        p.create_dataset("predictions/kernel:0", data=np.ones((4, 3), np.float32))
        p.create_dataset("predictions/bias:0", data=np.zeros((3,), np.float32))
    tree = keras_h5.convert_file(path)
    assert tree["head"]["kernel"].shape == (4, 3) and tree["head"]["bias"].shape == (3,)

    with pytest.raises(WeightsError, match="not found"):
        keras_h5.convert_file(tmp_path / "missing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(WeightsError, match="cannot read Keras weights"):
        keras_h5.convert_file(junk)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(WeightsError, match="not a Keras weights file"):
        keras_h5.convert_file(empty)
    with pytest.raises(WeightsError, match="unrecognised Keras layers.*stem_block"):
        keras_h5.convert_layers({"stem_block": [np.zeros((3,))]})
    with pytest.raises(WeightsError, match="has 2 weights"):
        keras_h5.convert_layers({"conv1_bn": [np.zeros((3,)), np.zeros((3,))]})
