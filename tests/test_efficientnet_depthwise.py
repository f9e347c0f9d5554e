"""EfficientNet-Lite's depthwise convs use MobileNet's implementation (facejax/models/depthwise.py):
no grouped conv on XLA:CPU, the same numbers as the grouped conv, the same parameter tree."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.merge import assign_weights, flatten, model_weights, unflatten
from facejax.errors import ConfigError
from facejax.models import create_model
from facejax.models.depthwise import DepthwiseConv
from facejax.models.efficientnet import EfficientNetLite


def _grouped_convs(jaxpr) -> int:
    """Convolutions with feature_group_count > 1 anywhere in a (closed) jaxpr."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated" and \
                eqn.params["feature_group_count"] > 1:
            n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _grouped_convs(sub)
    return n


@pytest.mark.parametrize("impl,grouped", [("auto", 0),
                                          pytest.param("shifted", 0, marks=pytest.mark.slow),
                                          pytest.param("grouped", 16, marks=pytest.mark.slow)])
def test_efficientnet_lite_on_cpu_runs_no_grouped_conv(impl, grouped):
    """Counted in the program compiled for the CPU: 'auto' traces both forms
    (`lax.platform_dependent`) and the CPU's is kept when lowered."""
    assert jax.default_backend() == "cpu"
    model = nnx.eval_shape(lambda: EfficientNetLite(rngs=nnx.Rngs(0), depthwise=impl))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    f = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
    jaxpr = jax.make_jaxpr(f)(state, x)
    compiled = jax.jit(f).lower(state, x).compile().as_text()
    convs = [line for line in compiled.splitlines() if " convolution(" in line]
    assert sum("feature_group_count" in c for c in convs) == grouped  # Lite0: 16 MBConv blocks
    # 'auto' carries the grouped form for accelerators; the fixed choices carry one form.
    assert _grouped_convs(jaxpr.jaxpr) == {"auto": 16, "shifted": 0, "grouped": 16}[impl]


@pytest.mark.slow
def test_efficientnet_lite_depthwise_impls_agree_and_share_one_tree():
    # Built abstractly and filled with the same random numbers, BN statistics included (random
    # init is slow on CPU); odd input size, so TF-SAME's odd pixel is exercised.
    x = jax.random.normal(jax.random.key(1), (2, 35, 35, 3))
    rng, tree, out, paths = np.random.default_rng(0), None, {}, {}
    for impl in ("grouped", "shifted"):
        m = nnx.eval_shape(lambda: create_model("efficientnet_lite0", num_classes=3,
                                                rngs=nnx.Rngs(0), depthwise=impl))
        flat = flatten(model_weights(m))
        paths[impl] = {k: v.shape for k, v in flat.items()}
        if tree is None:
            tree = unflatten({k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32) / 4
                              for k, v in flat.items()})
        assign_weights(m, tree)
        out[impl] = np.asarray(m.features(x))
    assert paths["grouped"] == paths["shifted"]
    np.testing.assert_allclose(out["shifted"], out["grouped"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_depthwise_conv_has_nnx_conv_s_parameter_and_initial_values():
    # Checkpoints and the lukemelas converter were written against a grouped nnx.Conv.
    dw = DepthwiseConv(24, 5, 2, True, "shifted", dtype=jnp.float32, rngs=nnx.Rngs(3))
    ref = nnx.Conv(24, 24, (5, 5), strides=2, padding="SAME", feature_group_count=24,
                   use_bias=False, rngs=nnx.Rngs(3))
    ours, theirs = nnx.to_flat_state(nnx.state(dw)), nnx.to_flat_state(nnx.state(ref))
    assert [p for p, _ in ours] == [p for p, _ in theirs] == [("kernel",)]
    np.testing.assert_array_equal(np.asarray(ours[0][1][...]), np.asarray(theirs[0][1][...]))
    x = jax.random.normal(jax.random.key(0), (1, 9, 9, 24))
    np.testing.assert_allclose(np.asarray(dw(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)


def test_unknown_depthwise_is_a_config_error():
    with pytest.raises(ConfigError, match="EfficientNet-Lite depthwise must be one of"):
        nnx.eval_shape(lambda: create_model("efficientnet_lite0", num_classes=2,
                                            rngs=nnx.Rngs(0), depthwise="fast"))
