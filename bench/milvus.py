"""Milvus Lite beside in-process ScaNN and exact search, in one run: build s, QPS, recall@10.

  .venv/bin/python bench/milvus.py                           # 100k and 1M x 128
  .venv/bin/python bench/milvus.py --cases 100000x128 --lite_types FLAT,HNSW

Data: bench/ann.py's clustered unit vectors (N/1000 clusters), 1,000 held-out queries, dot
product, recall@10 against exact top-10 (NumPy). Every backend goes through `SearchIndex`:
  - exact: the JAX chunked matmul + top-k (recall 1 by construction);
  - scann: tuned to target_recall 0.95 (build includes the tuning);
  - milvus-lite TYPE: backend=milvus on a Milvus Lite database in a temporary folder (build =
    create the collection + upsert every row + its index + facejax's leave-one-out recall check
    on 1,000 gallery items; "insert s" is the upsert alone, timed again after the build, up
    to 200k items).
QPS: all queries in one `search` call (Milvus: 1,024 per request), best of 3. Memory: this
process's resident-memory growth over the build (Milvus Lite runs in this process).
Writes bench/out/milvus_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from bench.ann import OUT, built, clustered, rss_bytes, timed  # noqa: E402
from facejax import cli  # noqa: E402
from facejax.retrieval.index import ExactSearcher, SearchIndex  # noqa: E402
from facejax.retrieval.metrics import ann_recall_at_k  # noqa: E402

K = 10
META = dict(model="bench", params_hash="0" * 64, normalization="none", l2_normalized=True,
            metric="dot", input_size=0, resize_mode="crop")


def _scann_setting(index) -> str:
    p = index.scann_params
    return f"leaves {p['leaves_to_search']}/{p['num_leaves']}, reorder {p['reorder']}"


def measure(name: str, make, q, truth, repeat: int = 3, extra_targets=()) -> dict:
    print(f"  building {name} ...", flush=True)
    index, build_s, memory = built(make)
    print(f"  built in {build_s:.1f}s; searching", flush=True)
    rows, first = timed(lambda: index.search(q, K)[0], repeat=1)
    _, t = timed(lambda: index.search(q, K), repeat=repeat if first < 30 else 1)
    one = q[:100 if index.backend != "milvus" else 20]
    _, t1 = timed(lambda: [index.search(v[None], K) for v in one], repeat=1)
    row = dict(backend=name, build_s=round(build_s, 2), qps=round(len(q) / t, 1),
               single_qps=round(len(one) / t1, 1),
               recall=round(ann_recall_at_k(rows, truth, K), 4), memory_mb=round(memory / 2**20))
    if index.backend == "scann":
        row["setting"] = _scann_setting(index)
        row["target"] = index.tuning["target_recall"]
        for target in extra_targets:  # the same index re-tuned: a row per target
            t0 = time.perf_counter()
            index.tune(target, k=K)
            tune_s = time.perf_counter() - t0
            rows2 = index.search(q, K)[0]
            _, t2 = timed(lambda: index.search(q, K), repeat=repeat)
            more = dict(row, backend=f"{name.split(' (')[0]} (target {target})",
                        build_s=round(build_s + tune_s, 2), qps=round(len(q) / t2, 1),
                        recall=round(ann_recall_at_k(rows2, truth, K), 4),
                        setting=_scann_setting(index), target=target, single_qps=None)
            print(f"  {json.dumps(more)}", flush=True)
            row.setdefault("more", []).append(more)
    if index.backend == "milvus":
        row["setting"] = f"{index._milvus.index_type} {index._milvus.search_params}"
        row["build_recall"] = (getattr(index._milvus, "recall", None) or {}).get("recall")
        # The upsert alone, again on the same collection (ids already there: a full rewrite);
        # up to 200k items (it scales linearly: rows per second are the figure).
        if index.size <= 200_000:
            t0 = time.perf_counter()
            index._milvus.upsert(index.ids, index.embeddings, index.labels, index.paths)
            row["insert_s"] = round(time.perf_counter() - t0, 2)
        index._milvus.drop()
    print(f"  {json.dumps(row)}", flush=True)
    return row


def run_case(n: int, d: int, args, tmp: str) -> list[dict]:
    print(f"== N={n:,} d={d}  (load {os.getloadavg()[0]:.1f})", flush=True)
    x, q = clustered(n, d, args.queries)
    t0 = time.perf_counter()
    # Chunked (JAX): NumPy's [Q, N] score matrix is 4 GB at 1M and was OOM-killed here.
    truth = ExactSearcher(x).search(q, K)[0]
    print(f"  ground truth {time.perf_counter() - t0:.1f}s", flush=True)
    paths = [f"img/{i}.jpg" for i in range(n)]
    labels = np.arange(n, dtype=np.int32) % 1000
    rows = []
    for backend in args.backends.split(","):
        if backend == "exact":
            rows.append(measure("exact (JAX)", lambda: SearchIndex.build(
                x, paths, labels, META | dict(embed_dim=d), backend="exact"), q, truth))
        elif backend == "scann":
            rows.append(measure("ScaNN (target 0.95)", lambda: SearchIndex.build(
                x, paths, labels, META | dict(embed_dim=d), backend="scann",
                target_recall=0.95), q, truth,
                extra_targets=[float(t) for t in args.scann_targets.split(",") if t]))
        elif backend == "milvus":
            for itype in args.lite_types.split(","):
                if itype != "FLAT" and n > args.lite_ann_max:
                    print(f"  skipping milvus-lite {itype} at N={n:,} (--lite_ann_max)")
                    continue
                uri = os.path.join(tmp, f"bench_{n}_{itype}.db")
                rows.append(measure(f"Milvus Lite {itype}", lambda u=uri, t=itype: (
                    SearchIndex.build(x, paths, labels, META | dict(embed_dim=d),
                                      backend="milvus",
                                      milvus=dict(uri=u, collection="bench", index_type=t))),
                    q, truth, repeat=1))
    rows = [r2 for r in rows for r2 in [r] + r.pop("more", [])]
    for r in rows:
        r.update(n=n, d=d)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| N | backend | setting | build s | insert s | memory MB | batched QPS | "
           "single-query QPS | recall@10 |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['n']:,} | {r['backend']} | {r.get('setting', '')} | {r['build_s']} | "
                   f"{r.get('insert_s', '')} | {r['memory_mb']:,} | {r['qps']:,.0f} | "
                   f"{r['single_qps'] or 0:,.0f} | {r['recall']:.4f} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="100000x128,1000000x128")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--backends", default="exact,scann,milvus")
    parser.add_argument("--lite_types", default="FLAT,HNSW",
                        help="Milvus Lite index types: FLAT, HNSW, IVF_FLAT")
    parser.add_argument("--lite_ann_max", type=int, default=100_000,
                        help="largest N for Lite's non-FLAT types (HNSW builds are slow)")
    parser.add_argument("--scann_targets", default="",
                        help="more recall targets to re-tune ScaNN to, e.g. 0.99 (a row each)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    os.makedirs(OUT, exist_ok=True)
    start_rss = rss_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, d in cases:
            rows += run_case(n, d, args, tmp)
    load = os.getloadavg()
    import pymilvus

    header = (f"Milvus benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, "
              f"pymilvus {pymilvus.__version__}, load average {load[0]:.1f}/{load[1]:.1f}/"
              f"{load[2]:.1f} at the end, start RSS {start_rss / 2**20:.0f} MB; "
              f"{args.queries} queries, k={K}).")
    md = header + "\n\n" + table(rows) + "\n"
    tag = args.tag or "_".join(f"{n}x{d}" for n, d in cases)
    with open(os.path.join(OUT, f"milvus_{tag}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(OUT, f"milvus_{tag}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(md)
    print(f"wrote {OUT}/milvus_{tag}.{{md,json}}")
    return 0


if __name__ == "__main__":
    cli.run(main)
