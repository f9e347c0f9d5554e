"""Nearest-neighbour speed vs recall: facejax's index (ScaNN, exact) against faiss and hnswlib.

  .venv/bin/python bench/ann.py --quick          # N=100k, d=128 (a few minutes on 2 cores)
  .venv/bin/python bench/ann.py                  # N=100k d=128, 100k d=512, 1M d=128
  .venv/bin/python bench/ann.py --embeddings e.npy --repeat 130   # real embeddings + noise

Data: unit vectors around Gaussian cluster centres (N/1000 clusters, within-cluster cosine
~0.7), 1,000 queries from the same distribution; dot product, recall@10 against exact top-10.
Rows per backend: build time, serialized size, and the best batched QPS (all queries in one
call, every core) among the settings swept that reach recall@10 >= 0.90 / 0.95 / 0.99, plus
single-query QPS at the 0.95 setting. "facejax auto" is SearchIndex with --target_recall: it
tunes on gallery items only (leave-one-out); its recall is measured on --check_queries (4,000)
further held-out queries, so that a target counts as met only on a sample as big as the tuner's.
Writes bench/out/ann_<tag>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

from facejax import cli
from facejax.errors import DataError
from facejax.retrieval.index import (AH_SHAPES, ExactSearcher, SearchIndex, exact_topk_numpy,
                                     faster_ah_shape)
from facejax.retrieval.metrics import ann_recall_at_k

K = 10
TARGETS = (0.90, 0.95, 0.99)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


# ----------------------------------------------------------------------------- data

def clustered(n: int, d: int, num_queries: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(10, n // 1000), d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m):
        x = centres[rng.integers(0, len(centres), m)]
        x = x + 0.65 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n).astype(np.float32), draw(num_queries).astype(np.float32)


def from_embeddings(path: str, n: int, num_queries: int, seed: int = 0):
    """Real embeddings repeated with small noise up to n items; queries are noisy copies too."""
    base = np.load(path).astype(np.float32)
    if base.ndim != 2:
        raise DataError(f"{path} must hold [N, D] embeddings")
    rng = np.random.default_rng(seed)
    d = base.shape[1]

    def draw(m):
        x = base[rng.integers(0, len(base), m)]
        x = x + 0.15 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(n).astype(np.float32), draw(num_queries).astype(np.float32)


# ----------------------------------------------------------------------------- timing

def timed(fn: Callable, repeat: int = 3):
    """(result, best wall time) over `repeat` runs; the machine is shared, so take the best."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def long_enough(queries: np.ndarray, seconds: float, target: float = 0.2) -> np.ndarray:
    """The queries repeated so that one timed call lasts ~`target` s (at most 10 copies): a
    1,000-query ScaNN call lasts ~10 ms, too short to time on a shared machine."""
    reps = max(1, min(10, int(np.ceil(target / max(seconds, 1e-6)))))
    return queries if reps == 1 else np.tile(queries, (reps, 1))


def rss_bytes() -> int:
    """Resident memory of this process now, after returning freed heap pages to the OS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def built(fn: Callable):
    """(object, build seconds, resident-memory growth in bytes) of one backend's build."""
    before = rss_bytes()
    obj, seconds = timed(fn, repeat=1)
    return obj, seconds, max(0, rss_bytes() - before)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


class Result:
    """One backend: build time, size, and a sweep of (setting, recall, batched QPS)."""

    def __init__(self, name: str, build_s: float, size_bytes: int, memory_bytes: int = 0):
        self.name, self.build_s, self.size_bytes = name, build_s, size_bytes
        self.memory_bytes = memory_bytes  # host RSS growth over the build (device memory apart)
        self.points: list[dict] = []
        self.single_qps: float | None = None

    def add(self, setting: str, recall: float, qps: float) -> None:
        self.points.append(dict(setting=setting, recall=recall, qps=qps))
        print(f"  {self.name:<28} {setting:<32} recall@10={recall:.4f}  QPS={qps:,.0f}",
              flush=True)

    def best(self, target: float) -> dict | None:
        ok = [p for p in self.points if p["recall"] >= target]
        return max(ok, key=lambda p: p["qps"]) if ok else None

    def to_json(self) -> dict:
        return dict(name=self.name, build_s=self.build_s, size_bytes=self.size_bytes,
                    memory_bytes=self.memory_bytes,
                    single_qps=self.single_qps, points=self.points)


def sweep(result: Result, settings, search: Callable, truth, queries, single: Callable | None):
    """Runs every setting; then single-query QPS at the cheapest one reaching 0.95."""
    for name, params in settings:
        rows, first = timed(lambda p=params: search(queries, p), repeat=1)
        timing = long_enough(queries, first)
        _, t = timed(lambda p=params: search(timing, p))
        result.add(name, ann_recall_at_k(rows, truth, K), len(timing) / t)
    best = result.best(0.95)
    if single is not None and best is not None:
        params = dict(settings)[best["setting"]]
        sample = queries[:200]
        _, t = timed(lambda: [single(q, params) for q in sample], repeat=1)
        result.single_qps = len(sample) / t


# ----------------------------------------------------------------------------- backends

META = dict(model="bench", params_hash="0" * 64, normalization="none", l2_normalized=True,
            metric="dot", cache_size=0, resize_mode="crop")


def bench_exact(x, q, truth, numpy_too: bool = True, chunk_sizes: str = "8192") -> list[Result]:
    out = []
    if numpy_too:
        r = Result("exact NumPy (matmul+argpartition)", 0.0, x.nbytes, x.nbytes)

        def numpy_search(queries, _):
            return np.concatenate([exact_topk_numpy(x, queries[i:i + 100], K)
                                   for i in range(0, len(queries), 100)])

        sweep(r, [("-", None)], numpy_search, truth, q, None)
        out.append(r)
    chunks = [int(c) for c in chunk_sizes.split(",")]
    searcher, build, memory = built(lambda: ExactSearcher(x, chunk_size=chunks[0]))
    on_device = jax.default_backend() != "cpu"
    if on_device:  # the gallery lives in device memory, which RSS does not see
        memory = searcher._chunks.nbytes
    r = Result(f"facejax exact (JAX, chunked, {jax.default_backend()})", build, x.nbytes, memory)
    # Query batch per device call: 256 is the default; a GPU may want more.
    batches = (256, 1024, 4096) if on_device else (256,)
    searchers = {chunks[0]: searcher}
    searchers.update({c: ExactSearcher(x, chunk_size=c) for c in chunks[1:]})

    def search(queries, setting):
        s = searchers[setting[0]]
        s.query_batch = setting[1]
        return s.search(queries, K)[0]

    settings = [(f"chunk={c} query_batch={b}", (c, b)) for c in chunks for b in batches]
    for _, setting in settings:
        search(q, setting)  # compile each shape outside the timing
    sweep(r, settings, search, truth, q,
          lambda one, setting: searchers[setting[0]].search(one[None], K))
    out.append(r)
    return out


def bench_scann(x, q, truth, quick: bool, check: tuple | None = None,
                ah_shapes: bool = True) -> list[Result]:
    """`check`: (queries, truth) on which the auto rows' recall is measured (default q, truth).
    `ah_shapes`: the auto rows choose between the AH shapes as a tuned build does (False: the
    default shape only, as facejax did before it tried shapes)."""
    import scann  # noqa: F401  (load the library before measuring the build's memory)

    meta = dict(META, embed_dim=x.shape[1])
    paths = [""] * len(x)
    index, build, memory = built(
        lambda: SearchIndex.build(x, paths, None, meta, backend="scann", target_recall=0))
    with tempfile.TemporaryDirectory() as tmp:
        index.save(os.path.join(tmp, "i"))
        size = dir_size(os.path.join(tmp, "i", "scann"))
    p = index.scann_params
    hand = Result(f"ScaNN hand ({p['num_leaves']} leaves, AH {p['dims_per_block']} dim/block, "
                  "reorder)", build, size, memory)
    nl = p["num_leaves"]
    leaves = sorted({1, 2} | {max(1, round(nl * f)) for f in
                     ((0.005, 0.01, 0.02, 0.04, 0.08) if quick else
                      (0.003, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.12))})
    reorders = (20, 50, 100) if quick else (10, 20, 30, 50, 100, 200)
    settings = [(f"leaves={L} reorder={R}", (L, R)) for L in leaves for R in reorders]
    sweep(hand, settings,
          lambda queries, s: index.search(queries, K, leaves_to_search=s[0], reorder=s[1])[0],
          truth, q,
          lambda one, s: index.search(one[None], K, leaves_to_search=s[0], reorder=s[1]))

    # The tuned build tries each AH shape (SearchIndex.tune_ah_shape): here the other shape is
    # built once and both are tuned per target, with the same choice (faster_ah_shape).
    shapes = {p["dims_per_block"]: index}
    if ah_shapes:
        for dims in AH_SHAPES:
            if dims not in shapes:
                other, b2, _ = built(lambda d=dims: SearchIndex.build(
                    x, paths, None, meta, backend="scann", target_recall=0,
                    scann_params=dict(dims_per_block=d)))
                shapes[dims] = other
                build += b2  # the auto build pays for every shape
    name = "facejax auto (ScaNN, target_recall" + (", AH shape tuned)" if ah_shapes else ")")
    auto = Result(name, build, size, memory)
    first_dims = p["dims_per_block"]
    before = Result(f"facejax auto, AH {first_dims} only (before)", build, size, memory)
    for target in TARGETS:
        t0 = time.perf_counter()
        tunings = {d: i.tune(target, k=K) for d, i in shapes.items()}
        tune_s = time.perf_counter() - t0
        kept = faster_ah_shape(tunings)
        for dims, row in ((kept, auto), (first_dims, before)):
            if row is before and (kept == first_dims or not ah_shapes):
                continue
            index, tuning = shapes[dims], tunings[dims]
            _, first = timed(lambda: index.search(q, K), repeat=1)
            timing = long_enough(q, first)
            _, t = timed(lambda: index.search(timing, K))
            check_q, check_truth = check or (q, truth)
            recall = ann_recall_at_k(index.search(check_q, K)[0], check_truth, K)
            qps = ", ".join(f"AH {d}: {tt['qps']:,.0f}" for d, tt in tunings.items())
            row.add(f"target={target} -> AH {dims} L={tuning['leaves_to_search']} "
                    f"R={tuning['reorder']} (tune {tune_s:.0f}s on {tuning['num_queries']}; "
                    f"tuner QPS {qps})", recall, len(timing) / t)
            row.points[-1]["target"] = target
            if target == 0.95:
                one = q[:200]
                _, t1 = timed(lambda o=one: [index.search(v[None], K) for v in o], repeat=1)
                row.single_qps = len(one) / t1
    if ah_shapes:  # the default shape where it was kept too, for the before/after table
        before.points += [dict(pt) for pt in auto.points
                          if f"AH {first_dims} " in pt["setting"]]
    # A target row counts only when its own target was reached on the real queries.
    for row in (auto, before):
        row.points = [pt for pt in row.points if pt["recall"] >= pt["target"] - 1e-9] or \
            row.points
    return [auto, before, hand] if ah_shapes else [auto, hand]


def bench_ivf_pq(x, q, truth, quick: bool, nlist: int, m: int, grid: bool) -> Result:
    """faiss IVF + PQ fast-scan (m 4-bit codes) + float refine, nprobe x k_factor swept."""
    import faiss

    n, d = x.shape

    def build_ivf():
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fsr,RFlat",
                                    faiss.METRIC_INNER_PRODUCT)
        index.train(x[: min(n, 100_000)])
        index.add(x)
        return index

    ivf, build, memory = built(build_ivf)
    r = Result(f"faiss IVF{nlist}+PQ{m}x4fsr+refine", build,
               len(faiss.serialize_index(ivf)), memory)
    nprobes = (8, 16, 32, 64) if quick else (2, 4, 8, 16, 32, 64, 128)
    kfactors = (4, 16) if quick else (1, 2, 4, 8, 16)
    if grid:
        nprobes, kfactors = (1,) + nprobes, kfactors + (32,)
    ivf_pq = faiss.downcast_index(ivf.base_index)

    def ivf_search(queries, s):
        ivf_pq.nprobe = s[0]
        ivf.k_factor = s[1]
        return ivf.search(queries, K)[1]

    sweep(r, [(f"nprobe={a} k_factor={b}", (a, b)) for a in nprobes for b in kfactors
              if a <= nlist], ivf_search, truth, q, lambda one, s: ivf_search(one[None], s))
    return r


def bench_faiss(x, q, truth, quick: bool, hnsw: bool = True, grid: bool = False
                ) -> list[Result]:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    n, d = x.shape
    out = []

    def build_flat():
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index

    flat, build, memory = built(build_flat)
    r = Result("faiss Flat (exact, BLAS)", build, x.nbytes, memory)
    sweep(r, [("-", None)], lambda queries, _: flat.search(queries, K)[1], truth, q,
          lambda one, _: flat.search(one[None], K)[1])
    out.append(r)
    flat = None
    nlist = int(4 * np.sqrt(n)) if n >= 500_000 else int(np.sqrt(n) * 2)
    nlist = 1 << round(np.log2(nlist))

    shapes = [(nlist, d // 2)]
    if grid:  # fewer, bigger lists; a PQ code per dimension (as ScaNN's AH 1 dim/block)
        shapes = [(nlist // 4, d // 2), (nlist, d // 2), (nlist, d)]
    for nl, m in shapes:
        out.append(bench_ivf_pq(x, q, truth, quick, nl, m, grid))
        gc.collect()

    def build_hnsw():
        index = faiss.IndexHNSWFlat(d, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 100
        index.add(x)
        return index

    if not hnsw:
        return out
    hnsw, build, memory = built(build_hnsw)
    r = Result("faiss HNSW M16", build, len(faiss.serialize_index(hnsw)), memory)

    def hnsw_search(queries, ef):
        hnsw.hnsw.efSearch = ef
        return hnsw.search(queries, K)[1]

    efs = (16, 32, 64, 128) if quick else (16, 32, 64, 128, 256, 512)
    sweep(r, [(f"efSearch={e}", e) for e in efs], hnsw_search, truth, q,
          lambda one, e: hnsw_search(one[None], e))
    out.append(r)
    return out


def bench_hnswlib(x, q, truth, quick: bool) -> list[Result]:
    import hnswlib

    n, d = x.shape
    threads = os.cpu_count() or 1

    def build():
        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=n, ef_construction=100, M=16)
        index.add_items(x, np.arange(n), num_threads=threads)
        return index

    index, build_s, memory = built(build)
    with tempfile.TemporaryDirectory() as tmp:
        index.save_index(os.path.join(tmp, "h.bin"))
        size = os.path.getsize(os.path.join(tmp, "h.bin"))
    r = Result("hnswlib M16", build_s, size, memory)

    def search(queries, ef):
        index.set_ef(max(ef, K))
        return index.knn_query(queries, k=K, num_threads=threads)[0]

    efs = (16, 32, 64, 128) if quick else (16, 32, 64, 128, 256, 512)
    sweep(r, [(f"ef={e}", e) for e in efs], search, truth, q,
          lambda one, e: search(one[None], e))
    return [r]


# ----------------------------------------------------------------------------- output

def table(results: list[Result], title: str) -> str:
    head = ("| backend | build s | size MB | memory MB | QPS @0.90 | QPS @0.95 | QPS @0.99 | "
            "single-query QPS @0.95 | best recall |")
    lines = [f"### {title}", "", head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        cells = []
        for t in TARGETS:
            b = r.best(t)
            cells.append("–" if b is None else f"{b['qps']:,.0f}")
        top = max((p["recall"] for p in r.points), default=float("nan"))
        single = "–" if r.single_qps is None else f"{r.single_qps:,.0f}"
        lines.append(f"| {r.name} | {r.build_s:.1f} | {r.size_bytes / 2**20:.0f} | "
                     f"{r.memory_bytes / 2**20:.0f} | "
                     + " | ".join(cells) + f" | {single} | {top:.4f} |")
    return "\n".join(lines)


def plot(groups: list[tuple[str, list[Result]]], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 5), squeeze=False)
    for ax, (title, results) in zip(axes[0], groups):
        for r in results:
            pts = sorted(r.points, key=lambda p: p["recall"])
            # The Pareto front: the best QPS at or above each recall.
            front, best = [], 0.0
            for p in reversed(pts):
                if p["qps"] > best:
                    best = p["qps"]
                    front.append(p)
            front.reverse()
            style = "o-" if len(front) > 1 else "s"
            ax.plot([p["recall"] for p in front], [p["qps"] for p in front], style, label=r.name,
                    markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries / s (batched)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0.8, 1.001)
        ax.grid(True, which="both", alpha=0.3)
        for t in TARGETS:
            ax.axvline(t, color="grey", lw=0.6, ls=":")
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def run_case(n: int, d: int, args) -> tuple[str, list[Result]]:
    title = f"N={n:,} d={d} ({'real embeddings + noise' if args.embeddings else 'clustered'})"
    print(f"== {title}", flush=True)
    total = args.queries + args.check_queries
    if args.embeddings:
        x, q = from_embeddings(args.embeddings, n, total)
    else:
        x, q = clustered(n, d, total)
    exact = ExactSearcher(x)
    q, check_q = q[:args.queries], q[args.queries:]
    truth = exact.search(q, K)[0]
    check = (check_q, exact.search(check_q, K)[0]) if len(check_q) else None
    del exact
    results = []
    backends = args.backends.split(",")
    if "exact" in backends or "jax" in backends:
        results += bench_exact(x, q, truth, "exact" in backends, args.exact_chunks)
    if "scann" in backends:
        results += bench_scann(x, q, truth, args.quick, check, not args.one_ah_shape)
    if "faiss" in backends or "faiss_ivf" in backends:
        results += bench_faiss(x, q, truth, args.quick, hnsw="faiss" in backends,
                               grid=args.faiss_grid)
    if "hnswlib" in backends:
        results += bench_hnswlib(x, q, truth, args.quick)
    return title, results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=100k, d=128, fewer settings")
    parser.add_argument("--cases", default="", help="e.g. 100000x128,1000000x128")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--check_queries", type=int, default=4000,
                        help="more held-out queries for the auto-tuned rows' recall (0: none)")
    parser.add_argument("--embeddings", default="", help=".npy [N, D] of real embeddings")
    parser.add_argument("--backends", default="exact,scann,faiss,hnswlib",
                        help="any of exact (NumPy + JAX), jax (JAX only), scann, faiss, "
                        "faiss_ivf (Flat + IVF only), hnswlib")
    parser.add_argument("--exact_chunks", default="8192",
                        help="JAX exact search: gallery rows per device step, e.g. 8192,65536")
    parser.add_argument("--faiss_grid", action="store_true",
                        help="faiss IVF: also nlist/4 and PQ d x4fsr, nprobe 1, k_factor 32")
    parser.add_argument("--one_ah_shape", action="store_true",
                        help="auto rows: the default AH shape only (facejax before it tried "
                        "shapes); by default both shapes are built and the faster kept")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.cases:
        cases = [tuple(int(v) for v in c.split("x")) for c in args.cases.split(",")]
    elif args.quick:
        cases = [(100_000, 128)]
    else:
        cases = [(100_000, 128), (100_000, 512), (1_000_000, 128)]
    if args.embeddings:
        d_real = np.load(args.embeddings, mmap_mode="r").shape[1]
        cases = [(n, d_real) for n, _ in cases]
    tag = args.tag or ("quick" if args.quick else "full")
    os.makedirs(OUT, exist_ok=True)
    groups = [run_case(n, d, args) for n, d in cases]
    load = os.getloadavg()
    dev = jax.devices()[0]
    header = (f"ANN benchmark ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, JAX device "
              f"{dev.device_kind}, load average "
              f"{load[0]:.1f} at the end; {args.queries} queries, k={K}). Batched QPS is the "
              f"best over the swept settings reaching each recall@10. Memory: resident-memory "
              f"growth over the build (host), or the gallery's device bytes for a GPU.")
    md = header + "\n\n" + "\n\n".join(table(r, t) for t, r in groups) + "\n"
    with open(os.path.join(OUT, f"ann_{tag}.md"), "w") as f:
        f.write(md)
    with open(os.path.join(OUT, f"ann_{tag}.json"), "w") as f:
        json.dump({t: [r.to_json() for r in rs] for t, rs in groups}, f, indent=1)
    plot(groups, os.path.join(OUT, f"ann_{tag}.png"))
    print(md)
    print(f"wrote {OUT}/ann_{tag}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    cli.run(main)
