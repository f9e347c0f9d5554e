"""The new zoo families without reference frameworks: depthwise implementations agree, bad
architecture arguments are ConfigErrors, every registered preset builds abstractly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.merge import assign_weights, flatten, model_weights, unflatten
from facejax.errors import ConfigError
from facejax.models import create_model, get_spec
from facejax.models.mobilenet import DepthwiseConv

NEW = ("mobilenet_v2", "mobilenet_v2_035", "mobilenet_v3_small", "mobilenet_v3_large",
       "densenet121", "densenet169", "inception_v3")


@pytest.mark.slow
@pytest.mark.parametrize("side,k,stride,same", [(16, 3, 1, True), (16, 3, 2, True),
                                                (15, 5, 2, True), (16, 3, 2, False),
                                                (15, 5, 2, False), (9, 5, 1, False)])
def test_depthwise_shifted_equals_grouped(side, k, stride, same):
    x = jax.random.normal(jax.random.key(0), (2, side, side, 6))
    convs = {impl: DepthwiseConv(6, k, stride, same, impl, dtype=jnp.float32, rngs=nnx.Rngs(1))
             for impl in ("grouped", "shifted")}
    a, b = (np.asarray(c(x)) for c in convs.values())
    assert a.shape == b.shape == (2, -(-side // stride), -(-side // stride), 6)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mobilenet_depthwise_impls_agree_end_to_end():
    # Built abstractly and filled with the same random numbers (random init is slow on CPU).
    x = jax.random.normal(jax.random.key(2), (1, 35, 35, 3))
    rng, tree, out = np.random.default_rng(0), None, {}
    for impl in ("grouped", "shifted"):
        m = nnx.eval_shape(lambda: create_model("mobilenet_v3_small", num_classes=3,
                                                rngs=nnx.Rngs(0), depthwise=impl))
        if tree is None:
            tree = unflatten({k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) / 4
                              for k, v in flatten(model_weights(m)).items()})
        assign_weights(m, tree)
        out[impl] = np.asarray(m.features(x))
    np.testing.assert_allclose(out["shifted"], out["grouped"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kw,match", [
    ("mobilenet_v2", {"depthwise": "fast"}, "depthwise must be one of"),
    ("mobilenet_v2", {"alpha": 0.0}, "alpha must be in"),
    ("mobilenet_v3_large", {"version": "v4"}, "version must be one of"),
    ("densenet121", {"depth": 122}, "depth must be one of"),
    ("densenet121", {"layout": "caffe"}, "layout must be one of"),
    ("inception_v3", {"layout": "tf"}, "layout must be one of"),
    ("inception_v3", {"depth": 3}, "bad architecture arguments"),
])
def test_bad_architecture_arguments_are_config_errors(name, kw, match):
    with pytest.raises(ConfigError, match=match):
        nnx.eval_shape(lambda: create_model(name, num_classes=2, rngs=nnx.Rngs(0), **kw))


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_every_preset_builds(name):
    for source, preset in get_spec(name).presets.items():
        m = nnx.eval_shape(lambda: create_model(name, num_classes=2, rngs=nnx.Rngs(0),
                                                source=source))
        assert m.backbone.num_features > 0 and preset.input_size in (224, 299)
