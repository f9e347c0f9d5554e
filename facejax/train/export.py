"""`export_workdir(workdir)`: a run's best checkpoint -> `workdir/embedder/` (jax.export artifact).

The exported function takes uint8 images in the cache format ([B, S, S, 3], S =
config.data.image_size) and does the resize to the model's input size and the normalisation
itself, so whoever serves it needs no preprocessing code.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from facejax.data.augment import preprocess_eval
from facejax.errors import ConfigError
from facejax.retrieval.embed import export_embedder
from facejax.rundir import EMBEDDER_DIR
from facejax.runlock import hold_workdir_lock
from facejax.train.checkpoint import restore_model
from facejax.train.state import resolve_input, split_model

def make_embed_fn(model: nnx.Module, input_size: int, normalization: str):
    """(fn, params): fn(params, images_u8[B,S,S,3]) -> float32 [B, D] embeddings."""
    graphdef, params, stats, other = split_model(model)

    def embed(p, images_u8):
        m = nnx.merge(graphdef, p["params"], p["batch_stats"], other)
        return m.embed(preprocess_eval(images_u8, input_size, normalization), train=False)

    return embed, {"params": params, "batch_stats": stats}


EXPORT_DTYPES = ("float32", "bfloat16")


def export_workdir(workdir: str, which: str = "best", compute_dtype: str = "float32") -> str:
    """Exports the `which` ('best' | 'latest') checkpoint of `workdir`; returns the folder.

    `compute_dtype` 'bfloat16' runs the network in bf16 (float32 parameters, float32 unit-norm
    output): 1.56x the images/s of float32 for ResNet50 on an H100 (BENCHMARKS.md), slower on
    CPUs. Its embeddings differ from float32's by bf16 rounding (cosine ~0.999), so an index
    built by either export of the same checkpoint serves both.
    """
    if compute_dtype not in EXPORT_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {EXPORT_DTYPES}, got {compute_dtype!r}")
    if not os.path.isdir(workdir):  # restore_model says what a run folder needs
        return _export(workdir, which, compute_dtype)
    # Training in this folder could delete the checkpoint being read (retention) or rewrite
    # config.json under the export: one process at a time (runlock.Busy names the holder).
    with hold_workdir_lock(workdir, "export"):
        return _export(workdir, which, compute_dtype)


def _export(workdir: str, which: str, compute_dtype: str) -> str:
    model, config = restore_model(workdir, which, dtype=jnp.dtype(compute_dtype).type)
    size, normalization = resolve_input(config)
    fn, params = make_embed_fn(model, size, normalization)
    meta = dict(
        model=config.model.name,
        cache_size=int(config.data.image_size),  # the artifact's input: cache-format images
        model_input_size=size,
        resize_mode=config.data.resize_mode,
        face_crop=list(config.data.face_crop),
        normalization=normalization,
        l2_normalized=bool(config.model.l2_normalize),
        head=config.model.head,
        embedding=model.describe_embedding(),  # what an index of this embedder stores
        checkpoint=which,
        compute_dtype=compute_dtype,
    )
    out = os.path.join(workdir, EMBEDDER_DIR)
    export_embedder(fn, params, meta, out)
    return out
