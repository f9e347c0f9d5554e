"""Merge converted weights into freshly initialised parameters, loudly (big_vision style)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from facejax.errors import WeightsError

WEIGHT_FILTER = nnx.Any(nnx.Param, nnx.BatchStat)
_SHOW = 20  # list at most this many keys of each kind in an error


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested dict."""
    out: dict[str, Any] = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def _listing(title: str, keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{title} ({len(keys)}): " + ", ".join(keys[:_SHOW]) + more


def merge_params(loaded: Mapping[str, Any], init: Mapping[str, Any],
                 dont_load: Iterable[str] = ()) -> dict[str, Any]:
    """Takes every weight from `loaded`, except keys matching a `dont_load` regex (from `init`).

    Args:
      loaded: nested dict of arrays from a converter.
      init: nested dict of the freshly initialised model (`model_weights(model)`); leaves may
        be `jax.ShapeDtypeStruct`s (a model built under `nnx.eval_shape`, skipping random
        init) as long as nothing falls back to them.
      dont_load: regexes, matched with `re.fullmatch` against '/'-joined paths (e.g.
        'head/.*'); matching keys keep their initial value and may be absent from `loaded`.

    Returns:
      A nested dict shaped like `init`, with numpy arrays cast to the init dtypes.

    Raises:
      WeightsError listing every missing, unexpected and wrongly shaped key.
    """
    patterns = [re.compile(p) for p in dont_load]
    skip = lambda k: any(p.fullmatch(k) for p in patterns)
    lf = {k: v for k, v in flatten(loaded).items() if not skip(k)}
    inf = flatten(init)
    missing = [k for k in inf if k not in lf and not skip(k)]
    unexpected = [k for k in lf if k not in inf]
    wrong = [f"{k} {tuple(np.shape(lf[k]))} != {tuple(np.shape(inf[k]))}"
             for k in lf if k in inf and np.shape(lf[k]) != np.shape(inf[k])]
    if missing or unexpected or wrong:
        parts = [_listing(t, ks) for t, ks in (("missing from the weights", missing),
                                              ("unexpected in the weights", unexpected),
                                              ("wrong shape (weights != model)", wrong)) if ks]
        raise WeightsError("pretrained weights do not fit the model; " + "; ".join(parts))
    abstract = [k for k, v in inf.items() if k not in lf and isinstance(v, jax.ShapeDtypeStruct)]
    if abstract:  # an nnx.eval_shape model has no initial values to fall back on
        raise WeightsError(_listing("no value for (abstract model, excluded by dont_load)",
                                    abstract))
    merged = {k: (np.asarray(lf[k], dtype=_dtype(v)) if k in lf else v) for k, v in inf.items()}
    return unflatten(merged)


def _dtype(v) -> np.dtype:
    return v.dtype if hasattr(v, "dtype") else np.asarray(v).dtype


def model_weights(model: nnx.Module) -> dict[str, Any]:
    """The model's Param + BatchStat values as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, WEIGHT_FILTER))


def assign_weights(model: nnx.Module, tree: Mapping[str, Any]) -> None:
    """Writes a complete nested dict (as `model_weights` returns) into `model` in place."""
    state = nnx.state(model, WEIGHT_FILTER)
    want, have = flatten(nnx.to_pure_dict(state)), flatten(tree)
    wrong = [f"{k} {tuple(np.shape(have[k]))} != {tuple(np.shape(v))}"
             for k, v in want.items() if k in have and np.shape(have[k]) != np.shape(v)]
    problems = (("missing", want.keys() - have.keys()), ("unexpected", have.keys() - want.keys()),
                ("wrong shape (weights != model)", wrong))
    if any(ks for _, ks in problems):
        raise WeightsError("weights do not fit the model; " + "; ".join(
            _listing(t, ks) for t, ks in problems if ks))
    values = {k: jnp.asarray(v, dtype=want[k].dtype) for k, v in have.items()}
    nnx.replace_by_pure_dict(state, unflatten(values))
    nnx.update(model, state)


def load_weights(model: nnx.Module, loaded: Mapping[str, Any],
                 dont_load: Iterable[str] = ()) -> nnx.Module:
    """merge_params(loaded, model_weights(model), dont_load) written into `model`; returns it."""
    assign_weights(model, merge_params(loaded, model_weights(model), dont_load))
    return model
