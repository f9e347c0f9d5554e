"""torchvision ResNet/VGG state_dict (from .pth or .safetensors) -> our nested parameter dict."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from facejax.convert import torchvision_zoo
from facejax.convert.merge import unflatten
from facejax.errors import WeightsError
from facejax.models.vgg import CFGS, conv_names

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch OIHW -> flax HWIO."""
    return np.transpose(w, (2, 3, 1, 0))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear (out, in) -> flax (in, out)."""
    return np.transpose(w)


def _put(out: dict, path: str, kind: str, leaf: str, v: np.ndarray) -> bool:
    """Stores one torch tensor of a conv/bn/linear module at `path`; False if `leaf` is odd."""
    if kind == "bn":
        if leaf == "num_batches_tracked":
            return True
        if leaf not in _BN:
            return False
        out[f"{path}/{_BN[leaf]}"] = v
    elif leaf == "weight":
        if v.ndim != (4 if kind == "conv" else 2):
            raise WeightsError(f"{path}: expected a {kind} weight, got shape {v.shape}")
        out[f"{path}/kernel"] = conv_kernel(v) if kind == "conv" else dense_kernel(v)
    elif leaf == "bias":
        out[f"{path}/bias"] = v
    else:
        return False
    return True


_RESNET_RULES: list[tuple[re.Pattern, Callable[[re.Match], tuple[str, str]]]] = [
    (re.compile(r"conv1\.(\w+)"), lambda m: ("backbone/stem_conv", "conv")),
    (re.compile(r"bn1\.(\w+)"), lambda m: ("backbone/stem_bn", "bn")),
    (re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.(\w+)"),
     lambda m: (f"backbone/stage{m[1]}_block{int(m[2]) + 1}/conv{m[3]}", "conv")),
    (re.compile(r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)"),
     lambda m: (f"backbone/stage{m[1]}_block{int(m[2]) + 1}/bn{m[3]}", "bn")),
    (re.compile(r"layer(\d)\.(\d+)\.downsample\.0\.(\w+)"),
     lambda m: (f"backbone/stage{m[1]}_block{int(m[2]) + 1}/downsample_conv", "conv")),
    (re.compile(r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)"),
     lambda m: (f"backbone/stage{m[1]}_block{int(m[2]) + 1}/downsample_bn", "bn")),
    (re.compile(r"fc\.(\w+)"), lambda m: ("head", "linear")),
]


def convert_resnet(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """torchvision `resnet{18..152}` state_dict -> nested dict for `create_model('resnetN')`."""
    out, unknown = {}, []
    for key, v in state_dict.items():
        for pattern, target in _RESNET_RULES:
            m = pattern.fullmatch(key)
            if m:
                path, kind = target(m)
                if not _put(out, path, kind, key.rsplit(".", 1)[1], np.asarray(v)):
                    unknown.append(key)
                break
        else:
            unknown.append(key)
    _no_unknown(unknown, "ResNet")
    return unflatten(out)


def vgg_feature_indices(cfg) -> list[int]:
    """Positions of the convs in torchvision's `features` Sequential (conv, ReLU, ..., pool)."""
    idx, out = 0, []
    for v in cfg:
        if v == "M":
            idx += 1
        else:
            out.append(idx)
            idx += 2
    return out


_FEATURE = re.compile(r"features\.(\d+)\.(\w+)")
_CLASSIFIER = re.compile(r"classifier\.(\d+)\.(\w+)")


def _nchw_to_nhwc_rows(w: np.ndarray, channels: int) -> np.ndarray:
    """Reorders the input axis of a torch (out, C*H*W) Linear weight to (out, H*W*C)."""
    hw = round((w.shape[1] // channels) ** 0.5)
    if w.ndim != 2 or channels * hw * hw != w.shape[1]:
        raise WeightsError(f"VGG classifier.0.weight: unexpected shape {w.shape}")
    return w.reshape(w.shape[0], channels, hw, hw).transpose(0, 2, 3, 1).reshape(w.shape)


def convert_vgg(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """torchvision `vgg16`/`vgg19` state_dict -> nested dict for `create_model('vggNN')`.

    fc1 is permuted from torch's NCHW flatten order (c, h, w) to our NHWC order (h, w, c).
    """
    feats = sorted({int(m[1]) for k in state_dict if (m := _FEATURE.fullmatch(k))})
    cfg = next((c for c in CFGS.values() if vgg_feature_indices(c) == feats), None)
    if cfg is None:
        raise WeightsError(
            f"not a torchvision VGG16/VGG19 state dict (no BatchNorm): conv layers at features "
            f"indices {feats}")
    names = dict(zip(feats, conv_names(cfg)))
    fc = {"0": "backbone/fc1", "3": "backbone/fc2", "6": "head"}
    out, unknown = {}, []
    for key, v in state_dict.items():
        v = np.asarray(v)
        if m := _FEATURE.fullmatch(key):
            ok = _put(out, f"backbone/{names[int(m[1])]}", "conv", m[2], v)
        elif (m := _CLASSIFIER.fullmatch(key)) and m[1] in fc:
            if m[1] == "0" and m[2] == "weight":
                v = _nchw_to_nhwc_rows(v, channels=cfg[-2])
            ok = _put(out, fc[m[1]], "linear", m[2], v)
        else:
            ok = False
        if not ok:
            unknown.append(key)
    _no_unknown(unknown, "VGG")
    return unflatten(out)


def _no_unknown(unknown: list[str], family: str) -> None:
    if unknown:
        more = f" ... and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise WeightsError(f"unrecognised keys for a torchvision {family} state dict: "
                           f"{', '.join(unknown[:10])}{more}")


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Detects ResNet vs VGG from the keys and converts (a 'module.' prefix is stripped)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if family := torchvision_zoo.family(sd):  # MobileNetV2/V3, DenseNet, Inception v3
        return torchvision_zoo.convert(sd, family)
    if any(k.startswith("layer1.") for k in sd):
        return convert_resnet(sd)
    if any(k.startswith("features.") for k in sd):
        return convert_vgg(sd)
    sample = ", ".join(list(sd)[:5])
    raise WeightsError(f"not a torchvision ResNet or VGG state dict (first keys: {sample})")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torchvision checkpoint: `.safetensors`, or `.pth`/`.pt` (zip or legacy)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"cannot read safetensors file {path}: {e}") from e
    from facejax.convert.pth import load_pth  # torch-free, refuses arbitrary pickled code
    return load_pth(path)


def convert_file(path: str | os.PathLike) -> dict[str, Any]:
    """A torchvision ResNet/VGG checkpoint file -> our nested parameter dict."""
    return convert_state_dict(load_state_dict(path))
