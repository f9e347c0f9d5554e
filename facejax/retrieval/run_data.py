"""The run's data as its exported embedder takes it: the embedder's input size, resize mode
and face crop win over the run config's (what training cached may differ from what was
exported)."""

from __future__ import annotations

import ml_collections

from facejax.retrieval.embed import Embedder


def run_face_crop(config, meta: dict) -> tuple[float, ...]:
    """The crop the embedder was exported with (as cache_size and resize_mode); embedders
    exported before face_crop existed use the run config's data.face_crop."""
    from facejax.data.decode import check_face_crop

    box = check_face_crop(config.data.face_crop)
    if "face_crop" in meta and check_face_crop(meta["face_crop"]) != box:
        exported = check_face_crop(meta["face_crop"])
        print(f"note: using the embedder's data.face_crop={exported} instead of the config's "
              f"{box}", flush=True)
        box = exported
    return box


def prepare_run_data(config, embedder: Embedder):
    """The run's data as the embedder takes it (its input size, resize mode and face_crop)."""
    from facejax.data.prepare import prepare_data

    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    size, mode = int(embedder.meta["cache_size"]), embedder.meta["resize_mode"]
    if (data_cfg.image_size, data_cfg.resize_mode) != (size, mode):
        print(f"note: using the embedder's input format {size}px/{mode} instead of the config's "
              f"{data_cfg.image_size}px/{data_cfg.resize_mode}", flush=True)
        data_cfg.image_size, data_cfg.resize_mode = size, mode
    if "face_crop" in embedder.meta:
        data_cfg.face_crop = run_face_crop(config, embedder.meta)
    return prepare_data(data_cfg)
