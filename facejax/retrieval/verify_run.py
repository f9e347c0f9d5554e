"""Pair verification of a training run: its exported embedder on a pairs file (LFW View-2)."""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from facejax.atomic import write_file_atomic
from facejax.errors import DataError
from facejax.retrieval import verification as V
from facejax.retrieval.embed import load_embedder
from facejax.retrieval.run_data import run_face_crop
from facejax.rundir import EMBEDDER_DIR, REPORT_DIR, read_run_config

JSON_NAME, MD_NAME = "verification.json", "verification.md"
# Looked for beside and inside the image folder when no pairs file is given (LFW's layout).
PAIRS_NAMES = ("pairs.txt", "lfw_pairs.txt")
_CHUNK = 1024  # images decoded and held at once


def find_pairs_file(root: str) -> str:
    """`pairs.txt` / `lfw_pairs.txt` inside `root` or beside it; DataError when there is none."""
    root = os.path.normpath(root)
    candidates = [os.path.join(d, n) for d in (root, os.path.dirname(root)) for n in PAIRS_NAMES]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise DataError(f"no pairs file given and none of {', '.join(candidates)} exists: "
                    f"pass --pairs")


def embed_images(embedder, root: str, paths: list[str], *, face_crop, max_pixels: int,
                 batch_size: int, progress: bool = True):
    """Decodes (as the run did) and embeds `paths` under `root`, a chunk at a time.

    Returns (embeddings f32[M, D], kept paths, skipped [(path, reason)]).
    """
    from tqdm import tqdm

    from facejax.data.decode import BadImage, decode_image

    size, mode = int(embedder.meta["cache_size"]), embedder.meta["resize_mode"]
    out, kept, skipped = [], [], []
    with tqdm(total=len(paths), desc="decode+embed", unit="img", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(paths), _CHUNK):
            images = []
            for p in paths[start:start + _CHUNK]:
                try:
                    images.append(decode_image(os.path.join(root, p), size, mode, max_pixels,
                                               face_crop))
                    kept.append(p)
                except BadImage as e:
                    skipped.append((p, str(e)))
            if images:
                out.append(embedder.embed_array(np.stack(images), batch_size=batch_size,
                                                progress=False))
            bar.update(min(_CHUNK, len(paths) - start))
    dim = int(embedder.meta["embed_dim"])
    emb = np.concatenate(out) if out else np.zeros((0, dim), np.float32)
    return emb, kept, skipped


def verify_workdir(workdir: str, pairs_path: str | None = None, root: str | None = None, *,
                   config: ml_collections.ConfigDict | None = None, metric: str = "cosine",
                   name: str = "LFW", progress: bool = True) -> dict:
    """Runs the k-fold verification protocol with the run's embedder; writes
    `workdir/report/verification.json` and `verification.md`.

    `root` (the folder the pairs' `Name/Name_0001.jpg` live in) defaults to the run's
    data.root, `pairs_path` to a pairs.txt / lfw_pairs.txt in or beside it, `config` to the
    run's config.json. Images are decoded with the embedder's input size, resize mode and
    face_crop (`run_face_crop`) and the config's max_pixels. Pairs whose images cannot be
    decoded are left out and listed under `skipped`.

    Raises:
      DataError: a missing or malformed pairs file, missing images, or too few usable pairs.
      CheckpointError: a missing or corrupt run config or embedder.
    """
    V.check_metric(metric)
    if config is None:
        config = read_run_config(workdir)
    root = root or config.data.root
    if not root:
        raise DataError("the run has no data.root: pass the images folder (--root)")
    pairs_path = pairs_path or find_pairs_file(root)
    pairs = V.read_pairs(pairs_path, root=root)
    print(f"pairs: {pairs.summary()} ({pairs_path})", flush=True)
    embedder = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    face_crop = run_face_crop(config, embedder.meta)
    emb, kept, skipped = embed_images(embedder, root, pairs.images(), face_crop=face_crop,
                                      max_pixels=int(config.data.max_pixels),
                                      batch_size=int(config.index.embed_batch_size),
                                      progress=progress)
    index_of = {p: i for i, p in enumerate(kept)}
    usable = np.asarray([a in index_of and b in index_of
                         for a, b in zip(pairs.left, pairs.right)], bool)
    if skipped:
        print(f"note: {len(skipped)} images could not be decoded; leaving out "
              f"{int((~usable).sum())} of {len(pairs)} pairs (e.g. {skipped[0][0]}: "
              f"{skipped[0][1]})", flush=True)
        if not usable.any():
            raise DataError(f"no pair of {pairs_path} has two decodable images")
        pairs = pairs.subset(usable)
    result = V.verify_embeddings(pairs, emb, index_of, metric=metric)
    result.update(
        name=name, pairs_file=os.path.abspath(pairs_path), root=os.path.abspath(root),
        model=embedder.meta.get("model", config.model.name),
        input_size=int(embedder.meta["cache_size"]), resize_mode=embedder.meta["resize_mode"],
        face_crop=list(face_crop), num_images=len(kept),
        skipped=[dict(path=p, reason=r) for p, r in skipped],
        workdir=os.path.abspath(workdir))
    out_dir = os.path.join(workdir, REPORT_DIR)
    write_file_atomic(os.path.join(out_dir, JSON_NAME),
                      (json.dumps(result, indent=1) + "\n").encode())
    write_file_atomic(os.path.join(out_dir, MD_NAME), (markdown_line(result) + "\n").encode())
    return result


def markdown_line(result: dict) -> str:
    line = V.format_result(result, result.get("name", "LFW"))
    name, _, rest = line.partition(": ")
    return (f"**{name}**: {rest} — {result['num_pairs']} pairs, {result['metric']}, "
            f"model {result['model']} at {result['input_size']}px/{result['resize_mode']}"
            + (f", face_crop {tuple(result['face_crop'])}" if result["face_crop"] else ""))


def calibrated_threshold(workdir: str) -> tuple[float | None, str | None]:
    """The same-person cosine threshold `verify_workdir` chose on all pairs of the run's last
    verification (report/verification.json), and that file's path relative to the run; (None,
    None) when the run has none. A damaged file is ignored with a note."""
    path = os.path.join(workdir, REPORT_DIR, JSON_NAME)
    try:
        with open(path) as f:
            result = json.load(f)
        t = result["best_threshold_all"]
        if result.get("metric", "cosine") != "cosine" or isinstance(t, bool) or \
                not isinstance(t, (int, float)):
            return None, None
        return float(t), os.path.relpath(path, workdir)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"note: ignoring {path}: {e}", flush=True)
        return None, None


# The "no match" threshold for gallery search accepts this share of unknown people (see
# facejax/retrieval/rejection.py): a pair threshold sees one impostor at a time, search the best
# of the whole gallery, so the pair threshold rejects almost no one there (LFW with dlib: 0.4%).
OPEN_SET_FALSE_ACCEPT = 0.05
REPORT_JSON = "report.json"


def match_threshold(workdir: str) -> tuple[float | None, str | None]:
    """The cosine below which a search's best result means "no match": the open-set threshold
    of the run's last evaluation (report/report.json: it accepts OPEN_SET_FALSE_ACCEPT of the
    people held out of the gallery) when there is one, else the pair threshold of
    `calibrated_threshold`; (None, None) when the run has neither. The source says which."""
    path = os.path.join(workdir, REPORT_DIR, REPORT_JSON)
    try:
        with open(path) as f:
            rejection = json.load(f).get("rejection") or {}
        for row in rejection.get("tradeoff") or []:
            t = row.get("threshold")
            if row.get("target_false_accept") == OPEN_SET_FALSE_ACCEPT and \
                    isinstance(t, (int, float)) and not isinstance(t, bool) and -1 <= t <= 1:
                return float(t), (f"{os.path.relpath(path, workdir)} (open set: accepts "
                                  f"{OPEN_SET_FALSE_ACCEPT:.0%} of unknown people)")
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError, TypeError) as e:
        print(f"note: ignoring {path}: {e}", flush=True)
    return calibrated_threshold(workdir)

