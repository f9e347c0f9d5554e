"""Competition layout output: a JSON file mapping each query file to its top-k gallery files."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from facejax.atomic import write_file_atomic
from facejax.errors import DataError
from facejax.retrieval.index import SearchIndex


def split_relative(path: str, split: str) -> str:
    """'query/a/b.jpg' -> 'a/b.jpg' for split 'query'; other paths are returned as they are.

    Paths are '/'-separated (as the scan writes them on every system), so a backslash is part
    of a file name: 'query/a\\b.jpg' -> 'a\\b.jpg', never 'a/b.jpg'.
    """
    prefix = f"{split}/"
    return path[len(prefix):] if path.startswith(prefix) and len(path) > len(prefix) else path


def competition_topk(query_paths: Sequence[str], query_emb: np.ndarray, index: SearchIndex,
                     k: int) -> dict[str, list[str]]:
    """{query file: [top-k gallery files, best first]}, names relative to query/ and gallery/.

    Raises:
      DataError: when two query files would get the same key (one's results would be lost).
    """
    rows, _ = index.search(query_emb, k)
    out: dict[str, list[str]] = {}
    source: dict[str, str] = {}
    for qp, r in zip(query_paths, rows):
        key = split_relative(qp, "query")
        if key in source:
            raise DataError(f"query files {source[key]!r} and {qp!r} both become the key "
                            f"{key!r} of the competition JSON: rename one of them")
        source[key] = qp
        out[key] = [split_relative(index.paths[j], "gallery") for j in r if j >= 0]
    return out


def write_competition_json(mapping: dict[str, list[str]], path: str) -> None:
    # A file name that is not valid UTF-8 (held as a surrogate escape) is written as a JSON
    # \\udcXX escape, so the file stays valid UTF-8 JSON and the name can be read back.
    text = json.dumps(mapping, indent=1, ensure_ascii=False)
    write_file_atomic(path, text.encode("utf-8", "backslashreplace"))
