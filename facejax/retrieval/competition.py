"""Competition layout output: a JSON file mapping each query file to its top-k gallery files."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from facejax.retrieval.atomic import write_file_atomic
from facejax.retrieval.index import SearchIndex


def split_relative(path: str, split: str) -> str:
    """'query/a/b.jpg' -> 'a/b.jpg' for split 'query'; other paths are returned as they are."""
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[1:]) if len(parts) > 1 and parts[0] == split else path


def competition_topk(query_paths: Sequence[str], query_emb: np.ndarray, index: SearchIndex,
                     k: int) -> dict[str, list[str]]:
    """{query file: [top-k gallery files, best first]}, names relative to query/ and gallery/."""
    rows, _ = index.search(query_emb, k)
    out = {}
    for qp, r in zip(query_paths, rows):
        out[split_relative(qp, "query")] = [split_relative(index.paths[j], "gallery")
                                            for j in r if j >= 0]
    return out


def write_competition_json(mapping: dict[str, list[str]], path: str) -> None:
    write_file_atomic(path, json.dumps(mapping, indent=1, ensure_ascii=False).encode("utf-8"))
