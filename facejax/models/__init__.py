"""Model zoo: every family's `MODELS` table merged into one registry."""

from facejax.models import (
    cnn,
    densenet,
    dlib_resnet,
    efficientnet,
    inception,
    mobilenet,
    pixels,
    resnet,
    resnet_v2,
    vgg,
)
from facejax.models.heads import EmbeddingModel
from facejax.models.registry import (
    ModelSpec,
    Preset,
    create_model,
    get_preset,
    get_spec,
    list_models,
)


def _merge(*families) -> dict[str, ModelSpec]:
    models: dict[str, ModelSpec] = {}
    for family in families:
        clash = models.keys() & family.MODELS.keys()
        if clash:
            raise RuntimeError(f"model names registered twice: {sorted(clash)}")
        models.update(family.MODELS)
    return models


MODELS = _merge(cnn, pixels, resnet, resnet_v2, vgg, efficientnet, dlib_resnet, mobilenet,
                densenet, inception)

__all__ = ["MODELS", "EmbeddingModel", "ModelSpec", "Preset", "create_model", "get_preset",
           "get_spec", "list_models"]
