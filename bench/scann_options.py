"""ScaNN build options side by side on one gallery: build time and QPS at recall@10 targets.

    python bench/scann_options.py                       # 1M x 128 clustered, the variants below
    python bench/scann_options.py --n 100000 --variants base,soar
    python bench/scann_options.py --embeddings bench/out/lfw_dlib.npy --n 300000 \
        --variants base,leaves4x,int8 --faiss     # real embeddings + noise; faiss's grid too

Each variant is facejax's default ScaNN shape (default_scann_params) with some tree() or
score_ah() options, the leaf count (`leaves_mult` x the default) or the reorder dtype changed,
built straight through ScaNN's builder. With --faiss, faiss's IVF + PQ fast-scan + refine grid
(nlist x PQ size x nprobe x k_factor) and HNSW are swept on the same queries, so that the best
faiss setting at each target is known. Every variant is searched
over the same leaves x reorder grid with the same held-out queries (4,000 by default, so that
the recall at 0.99 is measured to about +-0.002), and the best QPS reaching each target is
reported. Writes bench/out/scann_options_<n>x<d>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ann import OUT, clustered, from_embeddings, long_enough, timed  # noqa: E402
from facejax.retrieval.index import ExactSearcher, default_scann_params  # noqa: E402
from facejax.retrieval.metrics import ann_recall_at_k  # noqa: E402

K = 10
TARGETS = (0.95, 0.99)
# name -> (tree() overrides, score_ah() overrides[, other: leaves_mult, dims_per_block,
# reorder_dtype])
VARIANTS = {
    "base": ({}, {}),
    "train250k": (dict(training_sample_size=250_000), {}),
    "soar": (dict(soar_lambda=1.0, overretrieve_factor=2.0), {}),
    "soar1.5": (dict(soar_lambda=1.5, overretrieve_factor=2.0), {}),
    "iters20": (dict(training_iterations=20), {}),
    "kmeans++": (dict(random_init=False), {}),
    "leaves2x": ({}, {}, dict(leaves_mult=2)),
    "leaves4x": ({}, {}, dict(leaves_mult=4)),
    "leaves8x": ({}, {}, dict(leaves_mult=8)),
    "leaves0.5x": ({}, {}, dict(leaves_mult=0.5)),
    "dims2": ({}, {}, dict(dims_per_block=2)),
    "aq0.1": ({}, dict(anisotropic_quantization_threshold=0.1), {}),
    "aq0.4": ({}, dict(anisotropic_quantization_threshold=0.4), {}),
    "aq_off": ({}, dict(anisotropic_quantization_threshold=float("nan")), {}),
    "lut256d2": ({}, dict(hash_type="lut256"), dict(dims_per_block=2)),
    "int8": ({}, {}, dict(reorder_dtype="int8")),
    "bf16": ({}, {}, dict(reorder_dtype="bfloat16")),
    "leaves4x_int8": ({}, {}, dict(leaves_mult=4, reorder_dtype="int8")),
    "leaves4x_bf16": ({}, {}, dict(leaves_mult=4, reorder_dtype="bfloat16")),
    "leaves4x_soar": (dict(soar_lambda=1.0, overretrieve_factor=2.0), {}, dict(leaves_mult=4)),
    "dims2_soar": (dict(soar_lambda=1.0, overretrieve_factor=2.0), {}, dict(dims_per_block=2)),
    "dims2_int8": ({}, {}, dict(dims_per_block=2, reorder_dtype="int8")),
    "dims4": ({}, {}, dict(dims_per_block=4)),
    "spherical": (dict(spherical=True), {}, {}),
    "dims2_spherical": (dict(spherical=True), {}, dict(dims_per_block=2)),
    "leaves0.5x_dims2": ({}, {}, dict(leaves_mult=0.5, dims_per_block=2)),
    "leaves4x_train": (dict(training_sample_size=250_000), {}, dict(leaves_mult=4)),
    # Spherical leaves + 2 dims per block (the defaults' shape at 1M LFW) with int8 centroid
    # search (quantize_centroids) or another leaf count.
    "dims2_sph_qc": (dict(spherical=True, quantize_centroids=True), {}, dict(dims_per_block=2)),
    "dims2_sph_l0.5x": (dict(spherical=True), {}, dict(dims_per_block=2, leaves_mult=0.5)),
    "dims2_sph_l2x": (dict(spherical=True), {}, dict(dims_per_block=2, leaves_mult=2)),
    "dims2_sph_qc_l2x": (dict(spherical=True, quantize_centroids=True), {},
                         dict(dims_per_block=2, leaves_mult=2)),
    # ... and the AH anisotropic threshold (default 0.2) or SOAR on that shape.
    "dims2_sph_aq0.1": (dict(spherical=True), dict(anisotropic_quantization_threshold=0.1),
                        dict(dims_per_block=2)),
    "dims2_sph_aq0.4": (dict(spherical=True), dict(anisotropic_quantization_threshold=0.4),
                        dict(dims_per_block=2)),
    "dims2_sph_aq_off": (dict(spherical=True),
                         dict(anisotropic_quantization_threshold=float("nan")),
                         dict(dims_per_block=2)),
    "dims2_sph_soar": (dict(spherical=True, soar_lambda=1.0, overretrieve_factor=2.0), {},
                       dict(dims_per_block=2)),
}
LEAVES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 40)
REORDERS = (20, 30, 40, 60, 100, 150, 200, 300)  # stops where recall stops rising


def build(x: np.ndarray, tree: dict, ah: dict, other: dict | None = None,
          threads: int = 0):
    import scann

    other = other or {}
    p = default_scann_params(len(x), K)
    num_leaves = max(1, round(p["num_leaves"] * other.get("leaves_mult", 1)))
    kw = dict(num_leaves=num_leaves, num_leaves_to_search=p["leaves_to_search"],
              training_sample_size=p["training_sample_size"])
    kw.update(tree)
    ah_kw = dict(anisotropic_quantization_threshold=p["aq_threshold"])
    ah_kw.update(ah)
    dtype = {"float32": scann.ReorderType.FLOAT32, "int8": scann.ReorderType.INT8,
             "bfloat16": scann.ReorderType.BFLOAT16}[other.get("reorder_dtype", "float32")]
    builder = (scann.scann_ops_pybind.builder(x, K, "dot_product").tree(**kw)
               .score_ah(other.get("dims_per_block", p["dims_per_block"]), **ah_kw)
               .reorder(p["reorder"], quantize=dtype))
    if threads:
        builder.set_n_training_threads(threads)
    t0 = time.perf_counter()
    searcher = builder.build()
    return searcher, time.perf_counter() - t0, num_leaves


def sweep(searcher, q, truth, num_leaves: int, batch_size: int = 256) -> list[dict]:
    points = []
    for leaves in sorted(set(LEAVES) & set(range(1, num_leaves + 1))):
        for reorder in REORDERS:
            def run(queries, L=leaves, R=reorder):
                return searcher.search_batched_parallel(
                    queries, final_num_neighbors=K, pre_reorder_num_neighbors=R,
                    leaves_to_search=L, batch_size=batch_size)[0]
            recall = ann_recall_at_k(np.asarray(run(q), np.int64), truth, K)
            if points and points[-1]["leaves"] == leaves and recall <= points[-1]["recall"]:
                break  # the reorder has stopped paying at these leaves: more only costs
            (_, first) = timed(lambda: run(q), repeat=1)
            timing = long_enough(q, first)
            _, t = timed(lambda: run(timing))
            points.append(dict(leaves=leaves, reorder=reorder, recall=round(recall, 4),
                               qps=round(len(timing) / t)))
            if recall >= 0.995:
                break  # more reorder at these leaves only costs
        if points[-1]["recall"] >= 0.995 and points[-1]["reorder"] == 20:
            break
    return points


def best(points: list[dict], target: float) -> dict | None:
    ok = [p for p in points if p["recall"] >= target]
    return max(ok, key=lambda p: p["qps"]) if ok else None


def faiss_grid(x: np.ndarray, q, truth, hnsw: bool) -> list[dict]:
    """faiss's best settings: IVF (nlist ~sqrt(N) and ~4 sqrt(N)) + PQ fast-scan (d/2 or d
    sub-quantizers of 4 bits) + float refine, nprobe x k_factor; HNSW M16/M32 x efSearch."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n, d = x.shape
    rows = []

    def run_sweep(name, build_s, settings, search):
        points = []
        for setting, apply in settings:
            def run(queries, apply=apply):
                apply()
                return search(queries)
            recall = ann_recall_at_k(np.asarray(run(q), np.int64), truth, K)
            (_, first) = timed(lambda: run(q), repeat=1)
            timing = long_enough(q, first)
            _, t = timed(lambda: run(timing))
            points.append(dict(setting=setting, recall=round(recall, 4),
                               qps=round(len(timing) / t)))
        row = dict(variant=name, build_s=round(build_s, 1), points=points)
        for target in TARGETS:
            row[f"best@{target}"] = best(points, target)
        print(json.dumps({k: v for k, v in row.items() if k != "points"}), flush=True)
        rows.append(row)

    root = np.sqrt(n)
    for nlist in sorted({1 << round(np.log2(root * m)) for m in (1, 4)}):
        for m in (d // 2, d):
            t0 = time.perf_counter()
            index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fsr,RFlat",
                                        faiss.METRIC_INNER_PRODUCT)
            index.train(x[: min(n, max(100_000, 30 * nlist))])
            index.add(x)
            build_s = time.perf_counter() - t0
            ivf = faiss.downcast_index(index.base_index)

            def setter(a, b, index=index, ivf=ivf):
                def apply():
                    ivf.nprobe = a
                    index.k_factor = b
                return apply

            settings = [(f"nprobe={a} k_factor={b}", setter(a, b))
                        for a in (1, 2, 4, 8, 16, 32, 64) if a <= nlist
                        for b in (2, 4, 8, 16, 32)]
            run_sweep(f"faiss IVF{nlist},PQ{m}x4fsr,RFlat", build_s, settings,
                      lambda queries, index=index: index.search(queries, K)[1])
            del index, ivf
    if hnsw:
        for m in (16, 32):
            t0 = time.perf_counter()
            index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 100
            index.add(x)
            build_s = time.perf_counter() - t0

            def ef_setter(e, index=index):
                def apply():
                    index.hnsw.efSearch = e
                return apply

            run_sweep(f"faiss HNSW M{m}", build_s,
                      [(f"efSearch={e}", ef_setter(e)) for e in (16, 24, 32, 48, 64, 128, 256)],
                      lambda queries, index=index: index.search(queries, K)[1])
            del index
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--queries", type=int, default=4000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", default="",
                    help=".npy [N, D] of real embeddings: the gallery is noisy copies of them "
                    "(bench/ann.py's from_embeddings)")
    ap.add_argument("--faiss", default="", choices=("", "ivf", "all"),
                    help="also sweep faiss's IVF-PQ grid (ivf) and HNSW (all)")
    ap.add_argument("--batch_sizes", default="256",
                    help="search_batched_parallel batch sizes to sweep, e.g. 64,256,1024")
    ap.add_argument("--training_threads", type=int, default=0,
                    help="ScaNN set_n_training_threads (0: ScaNN's default)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")

    if args.embeddings:
        x, q = from_embeddings(args.embeddings, args.n, args.queries, seed=args.seed)
    else:
        x, q = clustered(args.n, args.d, args.queries, seed=args.seed)
    truth = ExactSearcher(x).search(q, K)[0]
    rows = []
    for name in variants:
        tree, ah, *other = VARIANTS[name]
        searcher, build_s, num_leaves = build(x, tree, ah, other[0] if other else None,
                                              args.training_threads)
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            points = sweep(searcher, q, truth, num_leaves, batch_size)
            label = name if batch_size == 256 else f"{name} batch {batch_size}"
            row = dict(variant=label, num_leaves=num_leaves, tree=tree, ah=ah,
                       build_s=round(build_s, 1), points=points)
            for target in TARGETS:
                row[f"best@{target}"] = best(points, target)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "points"}), flush=True)
        del searcher
    if args.faiss:
        rows += faiss_grid(x, q, truth, hnsw=args.faiss == "all")

    os.makedirs(OUT, exist_ok=True)
    data = "lfw" if args.embeddings else "clustered"
    stem = os.path.join(OUT, f"scann_options_{data}_{args.n}x{x.shape[1]}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(n=args.n, d=x.shape[1], data=data, queries=args.queries,
                       load=os.getloadavg(), rows=rows), f, indent=1, default=str)
    lines = [f"N={args.n:,} d={x.shape[1]} ({data}), {args.queries:,} held-out queries, "
             f"recall@{K}, load average {os.getloadavg()[0]:.1f} at the end", "",
             "| variant | build s | " + " | ".join(f"QPS @{t} (setting; recall)" for t in TARGETS)
             + " |", "|---|---:|" + "---:|" * len(TARGETS)]
    for r in rows:
        cells = []
        for t in TARGETS:
            b = r[f"best@{t}"]
            where = b.get("setting") or f"{b['leaves']}, {b['reorder']}" if b else ""
            cells.append(f"{b['qps']:,} ({where}; {b['recall']:.4f})" if b else "–")
        lines.append(f"| {r['variant']} | {r['build_s']} | " + " | ".join(cells) + " |")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
