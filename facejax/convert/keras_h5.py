"""Keras applications .h5 weights (Keras 3 `.weights.h5` or legacy Keras 2) -> our parameters.

Covers ResNet50/101/152 (v1), ResNet50V2/101V2/152V2 and VGG16/19, with or without top.
Layers are matched by name; inside a layer, weights are taken in Keras' own order
(kernel, bias) or (gamma, beta, moving_mean, moving_variance), which is how Keras itself loads
both formats. Keras kernels are already HWIO / (in, out) and its Flatten is NHWC, so no
transposes are needed. Each dataset's declared size is checked against the bytes the file stores
for it (`facejax.convert.limits`) before it is read: a chunked dataset whose chunks were never
written, or a gzip bomb, declares gigabytes in a few kilobytes.
"""

from __future__ import annotations

import os
import re
from typing import Any

import h5py
import numpy as np

from facejax.convert import keras_zoo
from facejax.convert.limits import ByteBudget
from facejax.convert.merge import unflatten
from facejax.errors import WeightsError

_BN_LEAVES = ("scale", "bias", "mean", "var")
_DENSE_LEAVES = ("kernel", "bias")

# Keras layer name -> our module path. Keras stage conv{s} is our stage{s-1}; in a block,
# `_0_` is the shortcut conv/bn and `_{k}_` the k-th conv/bn.
_RULES = [
    (re.compile(r"conv1_conv"), lambda m: "backbone/stem_conv"),
    (re.compile(r"conv1_bn"), lambda m: "backbone/stem_bn"),
    (re.compile(r"conv(\d)_block(\d+)_0_(conv|bn)"),
     lambda m: f"backbone/stage{int(m[1]) - 1}_block{m[2]}/downsample_{m[3]}"),
    (re.compile(r"conv(\d)_block(\d+)_([1-3])_(conv|bn)"),
     lambda m: f"backbone/stage{int(m[1]) - 1}_block{m[2]}/{m[4]}{m[3]}"),
    (re.compile(r"conv(\d)_block(\d+)_preact_bn"),
     lambda m: f"backbone/stage{int(m[1]) - 1}_block{m[2]}/preact_bn"),
    (re.compile(r"post_bn"), lambda m: "backbone/post_bn"),
    (re.compile(r"block\d_conv\d|fc1|fc2"), lambda m: f"backbone/{m[0]}"),
    (re.compile(r"predictions"), lambda m: "head"),
]


def _text(x) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def _read(ds, budget: ByteBudget) -> np.ndarray:
    """One weight array, after checking what the dataset declares against what it stores."""
    if not isinstance(ds, h5py.Dataset):
        raise WeightsError(f"{budget.path}: {ds.name} is a {type(ds).__name__}, not a dataset")
    if ds.dtype.kind not in "biufV":
        raise WeightsError(f"{budget.path}: dataset {ds.name} holds {ds.dtype}, not numbers")
    if ds.is_virtual or ds.external:
        raise WeightsError(f"{budget.path}: dataset {ds.name} refers to data in other files; "
                           "a weights file holds its own")
    budget.add(f"dataset {ds.name} of shape {ds.shape}", int(ds.size or 0) * ds.dtype.itemsize,
               ds.id.get_storage_size())
    return np.asarray(ds)


def _legacy_layers(g: h5py.Group, budget: ByteBudget) -> dict[str, list[np.ndarray]]:
    """Keras 2 `save_weights` layout: attrs layer_names / weight_names, datasets by name."""
    out = {}
    for name in (_text(n) for n in g.attrs["layer_names"]):
        layer = g[name]
        names = [_text(w) for w in layer.attrs.get("weight_names", [])]
        if names:
            out[name] = [_read(layer[w], budget) for w in names]
    return out


def _keras3_layers(g: h5py.Group, budget: ByteBudget) -> dict[str, list[np.ndarray]]:
    """Keras 3 `.weights.h5`: layers/<key>/vars/<i>, the layer name in vars' `name` attr."""
    out = {}
    for key, layer in g["layers"].items():
        if not isinstance(layer, h5py.Group) or "vars" not in layer:
            continue
        v = layer["vars"]
        if len(v):
            name = _text(v.attrs.get("name", key))
            out[name] = [_read(v[str(i)], budget) for i in range(len(v))]
    return out


def read_h5(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Keras weights file -> {layer name: [arrays in Keras order]} for layers with weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    budget = ByteBudget(path)
    try:
        with h5py.File(path, "r") as f:
            g = f.get("model_weights", f)  # full-model .h5 saves nest the weights
            if "layer_names" in g.attrs:
                return _legacy_layers(g, budget)
            if "layers" in g:
                return _keras3_layers(g, budget)
    except (OSError, KeyError, ValueError) as e:
        raise WeightsError(f"cannot read Keras weights {path}: {e}") from e
    raise WeightsError(f"{path} is not a Keras weights file (no layer_names attribute "
                       f"and no 'layers' group)")


def convert_layers(layers: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """{keras layer: [arrays]} -> nested dict for our ResNet / ResNetV2 / VGG model (and, via
    `keras_zoo`, MobileNetV2/V3, DenseNet and InceptionV3)."""
    if family := keras_zoo.family(layers):
        return keras_zoo.convert(layers, family)
    out, unknown = {}, []
    for name, arrays in layers.items():
        rule = next(((p, f) for p, f in _RULES if p.fullmatch(name)), None)
        if rule is None:
            unknown.append(name)
            continue
        path = rule[1](rule[0].fullmatch(name))
        leaves = _BN_LEAVES if re.search(r"(_bn|/bn\d)$", path) else _DENSE_LEAVES
        if len(arrays) > len(leaves) or (leaves is _BN_LEAVES and len(arrays) != 4):
            raise WeightsError(f"Keras layer {name!r} has {len(arrays)} weights; "
                               f"expected {' + '.join(leaves)}")
        for leaf, a in zip(leaves, arrays):
            out[f"{path}/{leaf}"] = a
    if unknown:
        raise WeightsError("unrecognised Keras layers (not ResNet/ResNetV2/VGG): "
                           + ", ".join(sorted(unknown)[:10]))
    return unflatten(out)


def convert_file(path: str | os.PathLike) -> dict[str, Any]:
    """A Keras applications weights file -> our nested parameter dict."""
    return convert_layers(read_h5(path))
