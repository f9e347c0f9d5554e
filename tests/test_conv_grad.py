"""models/conv.py: the 1x1 convolutions' matmul weight gradient equals XLA's own, the forward
is untouched, and whatever it does not cover takes XLA's path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from facejax.models import conv, create_model
from facejax.train import optim
from facejax.train import state as state_lib

NHWC = ("NHWC", "HWIO", "NHWC")


def _xw(b, h, c, f, k, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, h, h + 1, c)), dtype)  # not square: H != W
    w = jnp.asarray(rng.standard_normal((k, k, c, f)) * 0.2, dtype)
    return x, w


def _grads(fn, x, w, r):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * r), argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("padding", [((0, 0), (0, 0)), "VALID", "SAME"])
def test_1x1_gradients_equal_xla_and_the_forward_is_untouched(padding):
    x, w = _xw(4, 9, 5, 6, 1)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), padding,  # noqa: E731
                                                dimension_numbers=NHWC)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    new = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), padding,  # noqa: E731
                                                 dimension_numbers=dn)
    y_ref, y_new = jax.jit(ref)(x, w), jax.jit(new)(x, w)
    np.testing.assert_array_equal(np.asarray(y_new), np.asarray(y_ref))
    r = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape), jnp.float32)
    (dx_ref, dw_ref), (dx_new, dw_new) = _grads(ref, x, w, r), _grads(new, x, w, r)
    np.testing.assert_allclose(dx_new, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw_new, dw_ref, rtol=1e-5, atol=1e-4)
    # It took the matmul path: its weight gradient is a dot, XLA's is a convolution.
    assert "dot_general" in str(jax.make_jaxpr(jax.grad(lambda w: new(x, w).sum()))(w))
    assert "dot_general" not in str(jax.make_jaxpr(jax.grad(lambda w: ref(x, w).sum()))(w))


@pytest.mark.parametrize("k,stride,padding", [(3, 1, ((1, 1), (1, 1))), (1, 2, "VALID"),
                                              (1, 1, ((1, 1), (1, 1))), (7, 2, "SAME"),
                                              (3, 2, "VALID"), (2, 1, "VALID")])
def test_other_kernels_strides_and_paddings_take_xla_s_path(k, stride, padding):
    x, w = _xw(2, 9, 5, 6, k)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    f_new = lambda w: conv.conv_general_dilated(x, w, (stride, stride), padding,  # noqa: E731
                                                dimension_numbers=dn).sum()
    f_ref = lambda w: lax.conv_general_dilated(x, w, (stride, stride), padding,  # noqa: E731
                                               dimension_numbers=dn).sum()
    assert "dot_general" not in str(jax.make_jaxpr(jax.grad(f_new))(w))
    np.testing.assert_array_equal(jax.jit(jax.grad(f_new))(w), jax.jit(jax.grad(f_ref))(w))


@pytest.mark.parametrize("kw", [dict(feature_group_count=5), dict(rhs_dilation=(2, 2)),
                                dict(lhs_dilation=(2, 2))])
def test_grouped_and_dilated_convolutions_take_xla_s_path(kw):
    x, _ = _xw(2, 8, 5, 5, 1)
    cin = 1 if "feature_group_count" in kw else 5
    w = jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, cin, 5)), jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    args = (x, w, (1, 1), ((0, 0), (0, 0)))
    f_new = lambda w: conv.conv_general_dilated(*args[:1], w, *args[2:], dimension_numbers=dn,  # noqa: E731
                                                **kw).sum()
    f_ref = lambda w: lax.conv_general_dilated(*args[:1], w, *args[2:], dimension_numbers=dn,  # noqa: E731
                                               **kw).sum()
    assert "dot_general" not in str(jax.make_jaxpr(jax.grad(f_new))(w))
    np.testing.assert_allclose(jax.grad(f_new)(w), jax.grad(f_ref)(w), rtol=1e-6)


def test_bf16_weight_gradient_keeps_the_kernel_dtype():
    x, w = _xw(2, 8, 4, 3, 1, dtype=jnp.bfloat16)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    dw = jax.grad(lambda w: conv.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=dn).astype(jnp.float32).sum())(w)
    ref = jax.grad(lambda w: lax.conv_general_dilated(
        x, w, (1, 1), "VALID", dimension_numbers=dn).astype(jnp.float32).sum())(w)
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref, np.float32),
                               rtol=2e-2, atol=2e-1)


@pytest.mark.slow  # a ResNet50 gradient twice (~20 s): the full suite, not --fast
def test_every_model_conv_uses_it_and_model_gradients_match():
    """create_model gives each nnx.Conv the fast gradient; a ResNet50's parameter gradients
    (train mode, BatchNorm batch statistics) match the same model on XLA's own."""
    model = create_model("resnet50", num_classes=3, rngs=nnx.Rngs(0))
    convs = [n for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv)]
    assert len(convs) == 53
    assert all(c.conv_general_dilated is conv.conv_general_dilated for c in convs)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(x, train=True) ** 2)

    def layers():  # the order train.finetune=last_n counts layers in (it reads the jaxpr)
        g, p, st, o = state_lib.split_model(model)
        return optim.layer_order(lambda p, s, x: nnx.merge(g, p, s, o)(x, train=False), p, st,
                                 jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))

    fast, fast_layers = jax.jit(jax.grad(loss))(params), layers()
    for c in convs:
        c.conv_general_dilated = lax.conv_general_dilated
    graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    ref = jax.jit(jax.grad(loss))(params)
    assert fast_layers == layers() and len(fast_layers) == 107
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5 * float(np.abs(b).max()))


@pytest.mark.parametrize("k,padding", [(3, "VALID"), (3, ((0, 0), (0, 0))), (5, "VALID")])
def test_unpadded_kxk_runs_padded_and_cropped_with_the_same_values_and_gradients(k, padding):
    x, w = _xw(3, 11, 4, 6, k)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), padding,  # noqa: E731
                                                dimension_numbers=dn)
    new = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), padding,  # noqa: E731
                                                 dimension_numbers=dn)
    y_ref, y_new = jax.jit(ref)(x, w), jax.jit(new)(x, w)
    assert y_new.shape == y_ref.shape
    np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
    r = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape), jnp.float32)
    (dx_ref, dw_ref), (dx_new, dw_new) = _grads(ref, x, w, r), _grads(new, x, w, r)
    np.testing.assert_allclose(dx_new, dx_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw_new, dw_ref, rtol=1e-5, atol=1e-4)
    half = k // 2
    assert f"padding=(({half}, {half}), ({half}, {half}))" in str(jax.make_jaxpr(new)(x, w))
