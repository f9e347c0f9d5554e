"""merge_params / load_weights: loud about missing, unexpected and wrongly shaped weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.convert.merge import (
    assign_weights,
    flatten,
    load_weights,
    merge_params,
    model_weights,
    unflatten,
)
from facejax.errors import WeightsError


class Tiny(nnx.Module):
    def __init__(self, classes: int, rngs: nnx.Rngs):
        self.dense = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, classes, rngs=rngs)

    def __call__(self, x):
        return self.head(self.bn(self.dense(x), use_running_average=True))


def tiny(classes=2):
    # rbg: its samplers compile much faster on CPU than the default threefry.
    return Tiny(classes, nnx.Rngs(jax.random.key(0, impl="rbg")))


def numpy_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: rng.uniform(0.5, 1.5, v.shape), model_weights(model))


def test_flatten_roundtrip():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert flatten(tree) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert unflatten(flatten(tree)) == tree


def test_merge_takes_loaded_values_cast_to_init_dtype():
    init = {"w": np.zeros((2, 3), np.float32), "bn": {"mean": np.zeros(3, np.float32)}}
    loaded = {"w": np.ones((2, 3), np.float64), "bn": {"mean": np.full(3, 2.0)}}
    merged = merge_params(loaded, init)
    assert merged["w"].dtype == np.float32 and merged["bn"]["mean"].dtype == np.float32
    np.testing.assert_array_equal(merged["w"], 1.0)
    np.testing.assert_array_equal(merged["bn"]["mean"], 2.0)


def test_merge_lists_every_problem_at_once():
    init = {"a": np.zeros(2), "b": np.zeros((2, 2)), "c": np.zeros(1)}
    loaded = {"b": np.zeros((3, 2)), "c": np.zeros(1), "x": np.zeros(1)}
    with pytest.raises(WeightsError) as e:
        merge_params(loaded, init)
    msg = str(e.value)
    assert "missing from the weights (1): a" in msg
    assert "unexpected in the weights (1): x" in msg
    assert "wrong shape (weights != model) (1): b (3, 2) != (2, 2)" in msg


def test_merge_truncates_long_listings():
    init = {f"k{i:02d}": np.zeros(1) for i in range(25)}
    with pytest.raises(WeightsError, match=r"missing from the weights \(25\): k00, .* and 5 more"):
        merge_params({}, init)


def test_dont_load_keeps_init_and_ignores_the_loaded_head():
    init = {"backbone": {"w": np.zeros(2)}, "head": {"kernel": np.full((4, 7), 3.0)}}
    loaded = {"backbone": {"w": np.ones(2)}, "head": {"kernel": np.ones((4, 1000))},
              "aux_head": {"k": np.ones(1)}}
    merged = merge_params(loaded, init, dont_load=("head/.*", "aux_head/.*"))
    np.testing.assert_array_equal(merged["backbone"]["w"], 1.0)
    np.testing.assert_array_equal(merged["head"]["kernel"], 3.0)
    assert "aux_head" not in merged
    # Patterns must match the whole path: 'head' alone excludes nothing.
    with pytest.raises(WeightsError, match="wrong shape"):
        merge_params(loaded, init, dont_load=("head", "aux_head/.*"))


def test_abstract_init_cannot_fall_back():
    init = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "head": jax.ShapeDtypeStruct((3,),
                                                                                      jnp.float32)}
    merged = merge_params({"w": np.ones(2), "head": np.ones(3)}, init)
    assert merged["head"].dtype == np.float32
    with pytest.raises(WeightsError, match="abstract model.*head"):
        merge_params({"w": np.ones(2)}, init, dont_load=("head",))


@pytest.mark.slow
def test_load_weights_into_model_with_a_different_head():
    src, dst = tiny(classes=1000), tiny(classes=2)
    loaded = numpy_weights(src)
    head_before = np.array(dst.head.kernel[...])
    load_weights(dst, loaded, dont_load=("head/.*",))
    got = model_weights(dst)
    np.testing.assert_allclose(got["dense"]["kernel"], loaded["dense"]["kernel"], rtol=1e-7)
    np.testing.assert_allclose(got["bn"]["var"], loaded["bn"]["var"], rtol=1e-7)  # BatchStat
    np.testing.assert_array_equal(got["head"]["kernel"], head_before)
    assert isinstance(got["dense"]["kernel"], jax.Array)
    assert got["dense"]["kernel"].dtype == jnp.float32
    with pytest.raises(WeightsError, match=r"wrong shape .* head/kernel \(4, 1000\) != \(4, 2\)"):
        load_weights(dst, loaded)


def test_assign_weights_refuses_incomplete_or_misshapen_trees():
    model = tiny()
    before = model_weights(model)
    tree = numpy_weights(model)
    del tree["bn"]["mean"]
    with pytest.raises(WeightsError, match="missing .*bn/mean"):
        assign_weights(model, tree)
    tree = numpy_weights(model)
    tree["dense"]["bias"] = np.zeros(5)
    with pytest.raises(WeightsError, match=r"dense/bias \(5,\) != \(4,\)"):
        assign_weights(model, tree)
    jax.tree.map(np.testing.assert_array_equal, before, model_weights(model))  # unchanged
    tree = numpy_weights(model, seed=3)
    assign_weights(model, tree)
    x = jnp.ones((1, 3))
    expected = Tiny(2, nnx.Rngs(jax.random.key(1, impl="rbg")))
    assign_weights(expected, tree)
    np.testing.assert_array_equal(model(x), expected(x))
