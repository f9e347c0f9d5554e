"""Model registry: name -> backbone constructor + per-weight-source presets; `create_model`."""

from __future__ import annotations

import dataclasses
import inspect
import types
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from facejax.errors import ConfigError
from facejax.models import conv
from facejax.models.heads import EmbeddingModel

HEAD_KINDS = ("linear", "cosine")


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(d or {}))


@dataclasses.dataclass(frozen=True)
class Preset:
    """How one family of pretrained weights is fetched, converted and fed.

    `normalization` names a `facejax.data.augment.normalize` preset (`NORMALIZATIONS`).
    `converter` names the converter family (`torchvision`, `keras`, `lukemelas`, `dlib`, or ''
    for none); each `facejax.convert.<module>.convert_file(path)` returns our nested parameter dict.
    `sha256` is the full digest when it is published and known; otherwise '' and it is
    computed and recorded on first download. torchvision embeds the first 8 hex digits of the
    file's sha256 in its filename (`sha256_prefix`); Keras publishes an md5 (`md5`).
    `arch_kw` are architecture arguments the checkpoint requires (e.g. `layout='keras'`).
    `num_classes` is the size of the checkpoint's classifier (0: the file has no top).
    """

    input_size: int
    normalization: str
    converter: str = ""
    url: str = ""
    sha256: str = ""
    filename: str = ""
    sha256_prefix: str = ""
    md5: str = ""
    num_classes: int = 0
    arch_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "arch_kw", _frozen(self.arch_kw))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    `backbone(*, rngs, dtype, **arch_kw)` returns an `nnx.Module` with an int attribute
    `num_features` and `__call__(x [B,H,W,3], train: bool) -> [B, num_features]`.
    `presets` maps a weight source to its `Preset`; the first entry is the default source
    (a model without pretrained weights still has one preset for its input size/normalisation).
    `arch_kw` are the fixed arguments of this variant (e.g. `depth=50`).
    """

    backbone: Callable[..., nnx.Module]
    presets: Mapping[str, Preset]
    arch_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if not self.presets:
            raise ValueError("a ModelSpec needs at least one preset")
        object.__setattr__(self, "presets", _frozen(self.presets))
        object.__setattr__(self, "arch_kw", _frozen(self.arch_kw))

    @property
    def default_source(self) -> str:
        return next(iter(self.presets))


def _all_models() -> Mapping[str, ModelSpec]:
    # Imported at call time: the family modules import this file for the dataclasses.
    from facejax.models import MODELS

    return MODELS


def list_models() -> list[str]:
    """All registered model names, sorted."""
    return sorted(_all_models())


def get_spec(name: str) -> ModelSpec:
    models = _all_models()
    if name not in models:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(models))}")
    return models[name]


def get_preset(name: str, source: str = "") -> Preset:
    """The preset of `name` for weight `source` ('' = the model's default source)."""
    spec = get_spec(name)
    source = source or spec.default_source
    if source not in spec.presets:
        raise ConfigError(
            f"model {name!r} has no weights source {source!r}; "
            f"known: {', '.join(spec.presets)}")
    return spec.presets[source]


def _signature(factory: Callable) -> inspect.Signature:
    """The constructor's own signature (nnx's metaclass hides it behind *args, **kwargs)."""
    if isinstance(factory, type):
        params = list(inspect.signature(factory.__init__).parameters.values())[1:]  # no self
        return inspect.Signature(params)
    return inspect.signature(factory)


def create_model(name: str, *, num_classes: int, rngs: nnx.Rngs, embed_dim: int = 0,
                 l2_normalize: bool = True, head: str = "linear", dropout: float = 0.0,
                 dtype: Any = jnp.float32, source: str = "", **arch_kw) -> nnx.Module:
    """Builds backbone `name` plus embedding/classification heads (an `EmbeddingModel`).

    Args:
      name: a registry key (`list_models()`).
      num_classes: size of the classification head (>= 1).
      rngs: parameter (and, if dropout > 0, dropout) rng streams.
      embed_dim: 0 -> the embedding is the pooled features; else a Dense projection to this size.
      l2_normalize: L2-normalise `embed()` outputs.
      head: 'linear' (logits) or 'cosine' (cosines with normalised class weights).
      dropout: rate applied to the embedding before the classification head.
      dtype: compute dtype (parameters stay float32; logits/embeddings are returned as float32).
      source: weight source whose preset `arch_kw` apply (e.g. 'keras' -> ResNet v1 layout;
        '' = the model's default source).
      **arch_kw: architecture overrides, on top of the variant's and the preset's.
    """
    spec = get_spec(name)
    if head not in HEAD_KINDS:
        raise ConfigError(f"model.head must be one of {HEAD_KINDS}, got {head!r}")
    if int(num_classes) < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if int(embed_dim) < 0:
        raise ConfigError(f"embed_dim must be >= 0, got {embed_dim}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    kw = {**spec.arch_kw, **get_preset(name, source).arch_kw, **arch_kw}
    try:  # check a config's architecture keywords before building anything
        _signature(spec.backbone).bind(rngs=rngs, dtype=dtype, **kw)
    except TypeError as e:
        raise ConfigError(f"model {name!r}: bad architecture arguments {kw}: {e}") from e
    backbone = spec.backbone(rngs=rngs, dtype=dtype, **kw)
    # Convolutions that XLA:CPU runs slowly get CPU forms (models/conv.py: 1x1 weight
    # gradients as matmuls, unpadded k x k convs padded and cropped), chosen per platform when
    # lowered; other platforms keep XLA's own.
    conv.use_cpu_conv_rewrites(backbone)
    return EmbeddingModel(backbone, num_classes=int(num_classes), embed_dim=int(embed_dim),
                          l2_normalize=l2_normalize, head=head, dropout=float(dropout),
                          dtype=dtype, rngs=rngs)
