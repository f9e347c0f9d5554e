"""Retrieval: exported embedder (embed), gallery index (index), metrics, evaluation and reports.

Submodules are imported on demand; `index` loads ScaNN's shared library only for a ScaNN index.
"""
