"""max_pool_2x2 equals nnx.max_pool (2x2, stride 2, VALID) in value and gradient, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from facejax.models.pooling import max_pool_2x2


def _reference(x):
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def _grads(pool, x, g):
    return jax.grad(lambda v: jnp.sum(pool(v) * g))(x)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 4), (1, 55, 55, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_match_reduce_window_with_ties(shape, dtype):
    rng = np.random.default_rng(0)
    # Few distinct values, so most windows hold ties (ReLU zeros, flat image regions): the
    # gradient must go to the same element as select_and_scatter's, not be split among them.
    x = jnp.asarray(rng.integers(0, 3, shape).astype(np.float32), dtype)
    ref = _reference(x)
    out = max_pool_2x2(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    g = jnp.asarray(rng.normal(size=ref.shape).astype(np.float32), dtype)
    np.testing.assert_array_equal(np.asarray(_grads(max_pool_2x2, x, g), np.float32),
                                  np.asarray(_grads(_reference, x, g), np.float32))


def test_gradient_of_distinct_values_under_jit():
    x = jax.random.normal(jax.random.key(0), (3, 12, 10, 5))
    g = jax.random.normal(jax.random.key(1), (3, 6, 5, 5))
    got = jax.jit(lambda v: _grads(max_pool_2x2, v, g))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_grads(_reference, x, g)))


@pytest.mark.slow
def test_scratch_cnn_train_gradients_unchanged(monkeypatch):
    """The scratch CNN with max_pool_2x2 trains exactly as with flax's max_pool: same loss, same
    gradients, same BatchNorm statistics (ReLU zeros make ties in every block)."""
    from facejax.models import cnn

    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))

    def loss_and_grads():
        model = cnn.ScratchCNN(rngs=nnx.Rngs(0), input_size=32)

        def loss(m):
            return jnp.sum(m(x, train=True) ** 2)

        value, grads = nnx.value_and_grad(loss)(model)
        stats = nnx.state(model, nnx.BatchStat)
        return jax.tree.leaves((value, nnx.to_pure_dict(grads), nnx.to_pure_dict(stats)))

    new = loss_and_grads()
    monkeypatch.setattr(cnn, "max_pool_2x2", _reference)
    old = loss_and_grads()
    assert len(new) == len(old)
    for a, b in zip(new, old):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
