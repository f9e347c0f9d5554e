"""`search_workdir`: a run's top-k gallery images for a query image or folder, and its grid."""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from facejax.errors import DataError
from facejax.retrieval import report
from facejax.retrieval.embed import load_embedder
from facejax.retrieval.index import check_k, load_index
from facejax.retrieval.run_data import run_face_crop
from facejax.rundir import EMBEDDER_DIR, INDEX_DIR, read_run_config

_GRID_MAX_QUERIES = 16


def list_query_images(query: str) -> list[str]:
    """A single image file, or the image files under a folder (recursively, sorted)."""
    from facejax.data.sources import IMAGE_EXTS

    if os.path.isfile(query):
        return [query]
    if not os.path.exists(query):
        raise DataError(f"query {query} not found")
    if not os.path.isdir(query):
        raise DataError(f"query {query} is neither an image file nor a folder")
    found = []
    for dirpath, dirnames, files in os.walk(query):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(files)
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    if not found:
        raise DataError(f"query folder {query} has no images "
                        f"({', '.join(sorted(IMAGE_EXTS))})")
    return found


def search_workdir(workdir: str, query: str, k: int = 10, *, grid_png: str | None = None,
                   config: ml_collections.ConfigDict | None = None,
                   threshold: float | None = None) -> dict:
    """Top-k gallery images for a query image or folder: {queries: [...], skipped: [...]}.

    In a folder, undecodable files are skipped and listed; a single bad file is an error.
    Images above the run's `data.max_pixels` are refused like in training; `config`
    defaults to `read_run_config(workdir)`. With a same-person `threshold` (cosine), each
    result says whether it is a `match`: results below it are "no match".
    """
    from facejax.data.decode import BadImage, decode_image

    check_k(k)  # 1 <= k now; k <= the gallery size once the index is loaded
    if config is None:
        config = read_run_config(workdir)
    max_pixels = int(config.data.max_pixels)
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    index = load_index(os.path.join(workdir, INDEX_DIR), expect=embedder.meta)
    check_k(k, index.size)
    size, mode = int(embedder.meta["cache_size"]), embedder.meta["resize_mode"]
    face_crop = run_face_crop(config, embedder.meta)
    files = list_query_images(query)
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(decode_image(f, size, mode, max_pixels, face_crop))
            kept.append(f)
        except BadImage as e:
            if len(files) == 1:
                raise DataError(f"cannot use query image {f}: {e}") from None
            skipped.append((f, str(e)))
    if not kept:
        raise DataError(f"none of the {len(files)} images in {query} could be decoded "
                        f"(first: {skipped[0][0]}: {skipped[0][1]})")
    emb = embedder.embed_array(np.stack(images), progress=False)
    rows, scores = index.search(emb, k)
    names = index.info.get("label_names") or []
    out = []
    for f, r_row, s_row in zip(kept, rows, scores):
        results = []
        for rank, (r, s) in enumerate(zip(r_row, s_row), 1):
            if r < 0:
                continue
            label = int(index.labels[r])
            results.append(dict(rank=rank, path=index.paths[r], id=int(index.ids[r]),
                                label=label, score=float(s),
                                name=names[label] if 0 <= label < len(names) else "",
                                match=None if threshold is None else bool(s >= threshold)))
        out.append(dict(query=f, results=results))
    result = dict(k=k, gallery_size=index.size, root=index.info.get("root", ""), queries=out,
                  threshold=threshold, skipped=[dict(path=p, reason=r) for p, r in skipped])
    if grid_png:
        _search_grid(result, dict(zip(kept, images)), size, mode, max_pixels, grid_png,
                     face_crop)
    return result


def _search_grid(result: dict, query_images: dict, size: int, mode: str, max_pixels: int,
                 out_png: str, face_crop=()) -> None:
    from facejax.data.decode import BadImage, decode_image

    root = result["root"]

    def gallery_image(path: str):
        full = os.path.join(root, path)
        try:
            return decode_image(full, size, mode, max_pixels, face_crop)
        except BadImage:
            return None  # the gallery moved or is not made of files (idx/tfds): a blank tile

    rows = []
    for q in result["queries"][:_GRID_MAX_QUERIES]:
        rows.append(dict(
            image=query_images[q["query"]], caption=os.path.basename(q["query"])[:22],
            results=[dict(image=gallery_image(r["path"]), correct=None,
                          caption=f"{(r['name'] or os.path.basename(r['path']))[:18]}\n"
                                  f"{r['score']:.3f}")
                     for r in q["results"]]))
    report.draw_grid(rows, out_png, legend="top results, best first (caption: identity, "
                                           "cosine score)")
