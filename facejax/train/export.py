"""`export_workdir(workdir)`: a run's best checkpoint -> `workdir/embedder/` (jax.export artifact).

The exported function takes uint8 images in the cache format ([B, S, S, 3], S =
config.data.image_size) and does the resize to the model's input size and the normalisation
itself, so whoever serves it needs no preprocessing code.
"""

from __future__ import annotations

import os

from flax import nnx

from facejax.data.augment import preprocess_eval
from facejax.retrieval.embed import export_embedder
from facejax.train.checkpoint import restore_model
from facejax.train.state import resolve_input, split_model

EMBEDDER_DIR = "embedder"


def make_embed_fn(model: nnx.Module, input_size: int, normalization: str):
    """(fn, params): fn(params, images_u8[B,S,S,3]) -> float32 [B, D] embeddings."""
    graphdef, params, stats, other = split_model(model)

    def embed(p, images_u8):
        m = nnx.merge(graphdef, p["params"], p["batch_stats"], other)
        return m.embed(preprocess_eval(images_u8, input_size, normalization), train=False)

    return embed, {"params": params, "batch_stats": stats}


def export_workdir(workdir: str, which: str = "best") -> str:
    """Exports the `which` ('best' | 'latest') checkpoint of `workdir`; returns the folder."""
    model, config = restore_model(workdir, which)
    size, normalization = resolve_input(config)
    fn, params = make_embed_fn(model, size, normalization)
    meta = dict(
        model=config.model.name,
        input_size=int(config.data.image_size),  # the artifact's input: cache-format images
        model_input_size=size,
        resize_mode=config.data.resize_mode,
        face_crop=list(config.data.get("face_crop", ())),
        normalization=normalization,
        l2_normalized=bool(config.model.l2_normalize),
        head=config.model.head,
        checkpoint=which,
    )
    out = os.path.join(workdir, EMBEDDER_DIR)
    export_embedder(fn, params, meta, out)
    return out
