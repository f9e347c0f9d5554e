"""Parity: Keras MobileNetV2/V3, DenseNet, InceptionV3 (JAX backend, random weights and BN
statistics, saved by Keras 3 and in the legacy layout) == our converted models."""

import os
import re

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

from facejax.convert import keras_h5, keras_zoo
from facejax.data.augment import normalize
from facejax.errors import ConfigError, WeightsError
from facejax.models import create_model
from test_convert_keras import forward, ours  # the same load and forward as the zoo's first models

pytestmark = [pytest.mark.parity, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning:keras"),
              pytest.mark.filterwarnings("ignore::UserWarning:keras")]
TOL = 1e-4


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomise(model, seed: int) -> None:
    """Random BN gamma/beta/moving statistics and random conv/dense biases (init to zero)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            vals = [rng.uniform(0.5, 1.5, n)] if layer.scale else []
            vals += [rng.uniform(-0.3, 0.3, n), rng.normal(0.0, 0.3, n), rng.uniform(0.5, 2.0, n)]
            layer.set_weights(vals)
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.uniform(-0.1, 0.1, layer.bias.shape))


def features_after(model, layer_name: str):
    """The output of the layer right after `layer_name` (its activation)."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(layer_name) + 1].output


_KERAS2 = {"conv": "Conv", "conv_bn": "Conv/BatchNorm", "conv_1": "Conv_1",
           "conv_1_bn": "Conv_1/BatchNorm", "conv_2": "Conv_2", "logits": "Logits",
           "conv1_conv": "conv1/conv", "conv1_bn": "conv1/bn"}


def keras2_name(name: str) -> str:
    """The tf.keras 2 name of a Keras 3 MobileNetV3/DenseNet layer, as the downloadable files
    spell it (`expanded_conv_3/expand/BatchNorm`, `conv1/bn`): nested HDF5 groups."""
    m = re.fullmatch(r"(expanded_conv(?:_\d+)?)_(expand|depthwise|project|squeeze_excite_conv"
                     r"(?:_1)?)(_bn)?", name)
    if m:
        op = m[2].replace("squeeze_excite_conv", "squeeze_excite/Conv")
        return f"{m[1]}/{op}" + ("/BatchNorm" if m[3] else "")
    return _KERAS2.get(name, name)


def write_legacy_h5(model, path, rename=lambda n: n) -> None:
    """Keras 2 `save_weights` layout (how the downloadable ImageNet files are stored)."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [rename(layer.name).encode() for layer in model.layers]
        for layer in model.layers:
            name = rename(layer.name)
            g = f.require_group(name)
            names = [f"{name}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = [n.encode() for n in names]
            for n, w in zip(names, layer.weights):
                g.create_dataset(n, data=np.asarray(w.numpy()))


def count(model) -> int:
    """Param + BatchStat elements (Keras counts moving statistics as parameters)."""
    return sum(int(np.prod(v.shape)) for _, v in
               nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))))


def check(app: str, name: str, size: int, features, *, seed: int, tmp_path, legacy=False,
          pixels255=False, batch=2, rename=lambda n: n, **kw):
    """Builds Keras `app` with random weights, saves, converts, compares logits + features."""
    keras.utils.set_random_seed(seed)
    ref = getattr(keras.applications, app)(weights=None, input_shape=(size, size, 3),
                                           classifier_activation=None, **kw)
    randomise(ref, seed)
    both = keras.Model(ref.input, [ref.output, features(ref)])
    path = tmp_path / f"{name}.weights.h5"
    if legacy:
        path = tmp_path / f"{name}.h5"
        write_legacy_h5(ref, path, rename)
    else:
        ref.save_weights(str(path))
    x01 = np.random.default_rng(seed + 1).uniform(size=(batch, size, size, 3)).astype(np.float32)
    preset = "tf"
    if app.startswith("DenseNet"):
        preset = "torch"
    x_ours = np.asarray(normalize(jnp.asarray(x01), preset))
    logits, feats = (np.asarray(a) for a in both(x01 * 255 if pixels255 else x_ours,
                                                 training=False))
    model = ours(name, keras_h5.convert_file(path), source="keras")
    got_logits, got_feats = forward(model, jnp.asarray(x_ours))
    assert got_feats.shape == feats.reshape(batch, -1).shape
    assert rel_err(got_logits, logits) <= TOL
    assert rel_err(got_feats, feats.reshape(batch, -1)) <= TOL
    assert count(model) == ref.count_params()
    return ref


def _gap(model):
    return next(layer.output for layer in model.layers
                if isinstance(layer, keras.layers.GlobalAveragePooling2D))


def test_mobilenet_v2_parity(tmp_path):
    ref = check("MobileNetV2", "mobilenet_v2", 64, _gap, seed=0, tmp_path=tmp_path)
    assert ref.count_params() == 3_538_984


def test_mobilenet_v2_035_parity_legacy_h5(tmp_path):
    # Odd input size: Keras' correct_pad pads (1, 1) there, (0, 1) at even sizes.
    check("MobileNetV2", "mobilenet_v2_035", 67, _gap, seed=1, tmp_path=tmp_path, legacy=True,
          alpha=0.35)


def test_mobilenet_v3_small_parity_builtin_rescaling(tmp_path):
    # Keras is fed 0-255 pixels through its own Rescaling layer; we feed normalize('tf').
    ref = check("MobileNetV3Small", "mobilenet_v3_small", 64,
                lambda m: features_after(m, "conv_2"), seed=2, tmp_path=tmp_path,
                pixels255=True)
    assert ref.count_params() == 2_554_968


def test_mobilenet_v3_large_parity_legacy_h5_tf_keras2_names(tmp_path):
    check("MobileNetV3Large", "mobilenet_v3_large", 67, lambda m: features_after(m, "conv_2"),
          seed=3, tmp_path=tmp_path, pixels255=True, legacy=True, rename=keras2_name)


def test_densenet121_parity(tmp_path):
    ref = check("DenseNet121", "densenet121", 64, _gap, seed=4, tmp_path=tmp_path, batch=1)
    assert ref.count_params() == 8_062_504


def test_densenet169_parity_legacy_h5_tf_keras2_names(tmp_path):
    check("DenseNet169", "densenet169", 40, _gap, seed=5, tmp_path=tmp_path, legacy=True,
          batch=1, rename=keras2_name)


def test_inception_v3_parity(tmp_path):
    ref = check("InceptionV3", "inception_v3", 75, _gap, seed=6, tmp_path=tmp_path, batch=1)
    assert ref.count_params() == 23_851_784


def test_inception_v3_legacy_h5_odd_size(tmp_path):
    check("InceptionV3", "inception_v3", 83, _gap, seed=7, tmp_path=tmp_path, legacy=True,
          batch=1)


def test_zoo_keras_errors():
    with pytest.raises(WeightsError, match="unrecognised Keras layers for a MobileNet"):
        keras_h5.convert_layers({"bn_Conv1": [np.zeros(3)] * 4, "block_1_frobnicate": []})
    with pytest.raises(WeightsError, match="InceptionV3 file has 94 conv"):
        keras_zoo.convert({"conv2d": [np.zeros((3, 3, 3, 32))]}, "inception")
    with pytest.raises(WeightsError, match="has 2 weights"):
        keras_h5.convert_layers({"bn_Conv1": [np.zeros(3)] * 2})
    model = nnx.eval_shape(lambda: create_model("inception_v3", num_classes=2,
                                                rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="at least 75 px"):
        model.features(jnp.zeros((1, 74, 74, 3)))
