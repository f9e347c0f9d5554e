"""Serving benchmark: the search service under closed-loop load vs dlib-bin's peer vs the CLI.

    .venv/bin/python bench/serve.py --workdir runs/serve_dlib --wait_quiet 120  # + the dlib peer
    .venv/bin/python bench/serve.py --workdir runs/demo --wait_quiet 120        # Fashion-MNIST
    .venv/bin/python bench/serve.py --workdir runs/serve_dlib --levels 1,32 --seconds 10 \
        --no-peer --no-search-cli --server_args "--max_batch 64"

All traffic is loopback (127.0.0.1). In order, with no server running during the first two:
1. ceiling: `load_embedder(W/embedder).embed_array(images, batch_size=B)` images/s on already
   decoded uint8 images (`--ceiling_images`, the query files decoded as search_workdir decodes
   them), one warm-up batch then `--ceiling_runs` timed calls per B in `--ceiling_batch`; the
   best is the ceiling. The decode time of those files (one thread) is reported beside it;
2. `scripts/search.py --workdir W --query ONE_FILE --k K --json`: wall time of the whole
   process, `--cli_runs` runs, median (skip with --no-search-cli);
3. our service: `scripts/serve.py --workdir W --host 127.0.0.1 --port P [--server_args]` is
   started, `GET /readyz` polled until 200 (startup = spawn to ready), then the FIRST query
   is timed alone, then each level of `--levels` concurrent clients runs a closed loop:
   `--warmup` s untimed, then `--seconds` s timed (no new request after that; those in flight
   are drained and counted). Queries are `POST /v1/search` with the query files' own bytes
   (multipart `image`, `k`), cycling over `--num_queries` files (sorted; for an idx run, PNGs
   written from the idx test split to a temp folder);
4. the peer (`bench/serve_peer_dlib.py`, dlib-bin's own descriptor, same index, one uvicorn
   worker), for dlib_resnet runs: the same first query and levels;
5. the ceiling once more, at its best batch size, with the servers stopped (--no-ceiling_after
   skips it): CPU speed on a shared VM drifts, and this shows by how much.
The load client (`--client raw`, the default) keeps one HTTP/1.1 connection per client over
asyncio streams and sends pre-built request bytes: ~0.01 cores at 128 clients, where an
`httpx.AsyncClient` (`--client httpx`) takes ~0.3 of the 2 cores the server needs, and adds
~50 ms of first-use overhead to the first query. The first query's connection is opened before
its clock starts.
Per level: requests/s (200s only, over the time from the first request to the last answer),
latency p50/p95/p99/max of the 200s (client side, send to full body read), counts of 200,
503 (deliberate overload; the client then waits Retry-After, at most `--max_backoff` s) and
anything else (errors: other statuses, timeouts, refused connections), the CPU cores that the
server's process group, this client and all other processes ("other cores": ~0 on a quiet
machine; more means the figures are disturbed) used over the timed part, and the server's
resident memory after it. Our service's own `timings_ms` are summarised as medians. On a
shared machine, `--wait_quiet S` waits (at most S seconds) before the ceiling, the CLI and each
level until the machine has been idle for 3 s. Every server is stopped at the end, also on
errors. Writes `bench/out/serve_<workdir name>.md` and `.json` (all raw figures), and the
servers' logs beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
HOST = "127.0.0.1"  # never anything else
OUT_DIR = os.path.join(ROOT, "bench", "out")
BOUNDARY = "facejaxbenchboundary7c1e"
TICKS = os.sysconf("SC_CLK_TCK")


def git_state() -> str:
    """HEAD, and '+ changes' when the service's or this bench's files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "facejax", "scripts",
                                "bench/serve.py", "bench/serve_peer_dlib.py"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes' if dirty else ''}"


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- query images

def query_files(workdir: str, config, n: int, tmp: str, override: str = "") -> list[str]:
    """The first `n` query files, sorted: `override`, the run's image folder, or for an idx
    run PNGs written from the idx test split into `tmp`."""
    from facejax.retrieval.workdir import list_query_images

    if override:
        return list_query_images(override)[:n]
    source = config.data.source
    if source == "idx":
        from PIL import Image

        from facejax.data.sources import FASHION_MNIST_DIR, load_idx

        images, labels = load_idx(config.data.root or FASHION_MNIST_DIR, "test")
        files = []
        for i in range(min(n, len(images))):
            path = os.path.join(tmp, f"{i:05d}_{int(labels[i])}.png")
            Image.fromarray(images[i]).save(path)
            files.append(path)
        return files
    if source in ("folder", "competition") and config.data.root:
        return list_query_images(config.data.root)[:n]
    raise SystemExit(f"no query files for a {source!r} run: pass --queries FOLDER")


def multipart(path: str, k: int) -> bytes:
    """A multipart/form-data body with the file's bytes as `image` and the form field `k`."""
    with open(path, "rb") as f:
        data = f.read()
    ext = os.path.splitext(path)[1].lower()
    ctype = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        ext, "application/octet-stream")
    name = os.path.basename(path).replace('"', "_")
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"{name}\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + \
        f"\r\n--{BOUNDARY}--\r\n".encode()


# ----------------------------------------------------------------------------- offline parts

def offline_ceiling(workdir: str, config, files: list[str], n: int, batches: list[int],
                    runs: int) -> dict:
    """embed_array images/s on decoded uint8 images (best over batch sizes and runs)."""
    from facejax.data.decode import decode_image
    from facejax.retrieval.embed import load_embedder
    from facejax.retrieval.workdir import EMBEDDER_DIR, run_face_crop

    emb = load_embedder(os.path.join(workdir, EMBEDDER_DIR))
    size, mode = int(emb.meta["cache_size"]), emb.meta["resize_mode"]
    crop = run_face_crop(config, emb.meta)
    t0 = time.perf_counter()
    decoded = [decode_image(f, size, mode, int(config.data.max_pixels), crop) for f in files]
    decode_ms = (time.perf_counter() - t0) * 1e3 / len(files)
    images = np.stack([decoded[i % len(decoded)] for i in range(n)])
    out = dict(images=n, decode_ms_per_image=decode_ms, runs={})
    busy0, cpu0, start = system_busy(), time.process_time(), time.perf_counter()
    for b in batches:
        emb.embed_array(images[:b], batch_size=b, progress=False)  # warm-up: compiles batch b
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            emb.embed_array(images, batch_size=b, progress=False)
            rates.append(n / (time.perf_counter() - t0))
        out["runs"][str(b)] = rates
        print(f"# ceiling: embed_array batch {b}: "
              f"{', '.join(f'{r:.1f}' for r in rates)} img/s", flush=True)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    out["other_cores"] = max(0.0, system_busy() - busy0 - cpu) / wall
    out["cores"] = cpu / wall  # what embed_array itself keeps busy (warm-ups included)
    best_b = max(out["runs"], key=lambda b: max(out["runs"][b]))
    out.update(images_per_s=max(out["runs"][best_b]), batch=int(best_b))
    del emb, images, decoded
    gc.collect()
    return out


def search_cli(workdir: str, query: str, k: int, runs: int) -> dict:
    """Wall time of whole `scripts/search.py` processes; the last run's top-k ids."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "search.py"), "--workdir", workdir,
           "--query", query, "--k", str(k), "--json"]
    walls, ids = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        walls.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"search.py failed ({p.returncode}): {p.stderr[-2000:]}")
        res = json.loads(p.stdout[p.stdout.index("{"):])
        ids = [r["id"] for r in res["queries"][0]["results"]]
    print(f"# search.py: {', '.join(f'{w:.2f}' for w in walls)} s", flush=True)
    return dict(cmd=shlex.join(cmd), wall_s=walls, median_s=float(np.median(walls)),
                top_ids=ids)


# ----------------------------------------------------------------------------- processes

def group_usage(pgid: int) -> tuple[float, float]:
    """(CPU seconds, resident MiB) summed over the live processes of a process group."""
    cpu, rss = 0.0, 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:  # fields[2] is field 5, pgrp
                continue
            cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
            with open(f"/proc/{pid}/status") as f:
                rss += next(int(line.split()[1]) for line in f
                            if line.startswith("VmRSS:")) / 1024
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return cpu, rss


def peak_rss(pid: int) -> float | None:
    """The process's peak resident memory (VmHWM), MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def system_busy() -> float:
    """CPU seconds all cores have spent busy since boot (/proc/stat: not idle, not iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICKS


def wait_quiet(limit: float, what: str, cores: float = 0.25, need: int = 3) -> float:
    """Waits (at most `limit` s) until `need` 1-s windows in a row had < `cores` CPU busy."""
    if limit <= 0:
        return 0.0
    t0, calm = time.perf_counter(), 0
    while calm < need and time.perf_counter() - t0 < limit:
        b0 = system_busy()
        time.sleep(1.0)
        calm = calm + 1 if system_busy() - b0 < cores else 0
    waited = time.perf_counter() - t0
    if calm < need:
        print(f"# {what}: the machine is still busy after {waited:.0f}s; going on", flush=True)
    elif waited > need + 1:
        print(f"# {what}: waited {waited:.0f}s for a quiet machine", flush=True)
    return waited


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) != 0


class Server:
    """A server subprocess in its own process group; `stop()` ends the whole group."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: str):
        if not port_free(port):
            raise SystemExit(f"port {port} on {HOST} is already in use: pick another --port")
        self.name, self.cmd, self.port, self.log_path = name, cmd, port, log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, KERAS_BACKEND="jax", PYTHONUNBUFFERED="1")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://{HOST}:{port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def wait_ready(self, timeout: float) -> float:
        import httpx

        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=2.0) as c:
            while time.perf_counter() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                try:
                    if c.get(f"{self.url}/readyz").status_code == 200:
                        return time.perf_counter() - self.t0
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def usage(self) -> tuple[float, float]:
        return group_usage(self.proc.pid)

    def stop(self) -> None:
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the group this Popen created
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
            except ProcessLookupError:
                pass
        self.log.close()


# ----------------------------------------------------------------------------- load

class Sender:
    """POSTs pre-built `/v1/search` bodies; `send(i, body)` -> (status, headers, body bytes).

    'raw' (the default): each client owns one keep-alive HTTP/1.1 connection over asyncio
    streams, and the request bytes are built once per query file, so the client costs little
    CPU on the cores it shares with the server. 'httpx': one `httpx.AsyncClient` with a pool of
    `conc` connections (about ten times the client CPU at 128 clients)."""

    def __init__(self, kind: str, port: int, conc: int, api_key: str, timeout: float = 120.0):
        self.kind, self.port, self.timeout = kind, port, timeout
        self.url = f"http://{HOST}:{port}"
        self.headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        if api_key:
            self.headers["x-api-key"] = api_key
        self.conns: list = [None] * conc
        self.client = None
        if kind == "httpx":
            import httpx

            self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(
                max_connections=conc, max_keepalive_connections=conc))
            self.errors = (httpx.HTTPError,)
        else:
            self.errors = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                           TimeoutError, ValueError)

    def request(self, body: bytes) -> bytes:
        """The raw request bytes for one body (pre-build them: `send` takes either)."""
        head = (f"POST /v1/search HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
                + f"content-length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def connect(self, i: int) -> None:
        if self.kind == "raw" and self.conns[i] is None:
            self.conns[i] = await asyncio.open_connection(HOST, self.port)

    async def send(self, i: int, body: bytes, raw: bytes | None = None):
        if self.kind == "httpx":
            r = await self.client.post(f"{self.url}/v1/search", content=body,
                                       headers=self.headers)
            return r.status_code, r.headers, r.content
        try:
            async with asyncio.timeout(self.timeout):
                if self.conns[i] is not None and self.conns[i][0].at_eof():
                    await self.drop(i)  # the server closed it while idle (keep-alive timeout)
                reused = self.conns[i] is not None
                await self.connect(i)
                reader, writer = self.conns[i]
                writer.write(raw or self.request(body))
                await writer.drain()
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionResetError) as e:
                    if not reused or getattr(e, "partial", b""):
                        raise
                    # A kept-alive connection closed as we sent: retry once on a new one,
                    # as HTTP clients do (the request never reached the application).
                    await self.drop(i)
                    await self.connect(i)
                    reader, writer = self.conns[i]
                    writer.write(raw or self.request(body))
                    await writer.drain()
                    head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                hdr = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        hdr[k.strip().lower()] = v.strip()
                if "content-length" in hdr:
                    data = await reader.readexactly(int(hdr["content-length"]))
                elif hdr.get("transfer-encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        n = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                        parts.append(await reader.readexactly(n + 2))
                        if n == 0:
                            break
                    data = b"".join(p[:-2] for p in parts)
                else:
                    data = await reader.read()
                    hdr["connection"] = "close"
                if hdr.get("connection", "").lower() == "close":
                    await self.drop(i)
                return status, hdr, data
        except BaseException:
            await self.drop(i)
            raise

    async def drop(self, i: int) -> None:
        if self.kind == "raw" and self.conns[i] is not None:
            _, writer = self.conns[i]
            self.conns[i] = None
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        for i in range(len(self.conns)):
            await self.drop(i)


async def one_query(port: int, body: bytes, api_key: str, kind: str) -> dict:
    """A lone query on a fresh connection (opened before the clock starts): latency, answer."""
    s = Sender(kind, port, 1, api_key)
    try:
        await s.connect(0)
        raw = s.request(body)
        t0 = time.perf_counter()
        status, _, data = await s.send(0, body, raw)
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        await s.close()
    try:
        js = json.loads(data)
    except ValueError:
        js = {"text": data[:500].decode("utf-8", "replace")}
    return dict(ms=ms, status=status, body=js)


async def closed_loop(port: int, bodies: list[bytes], conc: int, args, timings: bool,
                      usage) -> dict:
    """`conc` clients each sending the next query as soon as their last one is answered."""
    s = Sender(args.client, port, conc, args.api_key)
    raws = [s.request(b) for b in bodies]
    lat, codes, errors, server_ms, bad, batch_sizes = [], {}, {}, [], [0, 0], []
    phase = {"record": False, "stop": 0.0, "count": 0}

    async def client(i: int):
        j = i
        while time.perf_counter() < phase["stop"]:
            rec = phase["record"]
            if rec and args.max_requests and phase["count"] >= args.max_requests:
                return
            phase["count"] += rec
            t0 = time.perf_counter()
            try:
                status, hdr, data = await s.send(i, bodies[j % len(bodies)],
                                                 raws[j % len(bodies)])
            except s.errors as e:
                if rec:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                await asyncio.sleep(0.05)
                continue
            finally:
                j += conc
            ms = (time.perf_counter() - t0) * 1e3
            if rec:
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    lat.append(ms)
                    try:
                        js = json.loads(data)
                    except ValueError:
                        js = {}
                    if not js.get("results"):
                        bad[0] += 1
                    if timings and "timings_ms" in js:
                        server_ms.append(js["timings_ms"])
                    if isinstance(js.get("batch_size"), int) and js["batch_size"] > 0:
                        batch_sizes.append(js["batch_size"])
            if status == 503:
                if rec and "retry-after" not in hdr:
                    bad[1] += 1
                try:
                    wait = float(hdr.get("retry-after", "1"))
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(min(max(wait, 0.0), args.max_backoff))

    try:
        if args.warmup > 0:
            phase["stop"] = time.perf_counter() + args.warmup
            await asyncio.gather(*(client(i) for i in range(conc)))
        phase.update(record=True, stop=time.perf_counter() + args.seconds)
        (srv0, _), busy0 = usage(), system_busy()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(conc)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        (srv1, rss), busy1 = usage(), system_busy()
    finally:
        await s.close()

    a = np.asarray(lat) if lat else np.full(1, np.nan)
    ok = codes.get(200, 0)
    other = sum(v for c, v in codes.items() if c not in (200, 503)) + sum(errors.values())
    out = dict(clients=conc, wall_s=wall, qps=ok / wall, ok=ok, n503=codes.get(503, 0),
               other=other, codes={str(c): v for c, v in codes.items()}, exceptions=errors,
               empty_results=bad[0], n503_no_retry_after=bad[1],
               p50_ms=float(np.percentile(a, 50)), p95_ms=float(np.percentile(a, 95)),
               p99_ms=float(np.percentile(a, 99)), max_ms=float(a.max()),
               mean_ms=float(a.mean()), client_cores=cpu / wall,
               server_cores=(srv1 - srv0) / wall, rss_mib=rss,
               other_cores=max(0.0, busy1 - busy0 - (srv1 - srv0) - cpu) / wall,
               loadavg=os.getloadavg(), latencies_ms=[round(x, 3) for x in lat])
    if batch_sizes:
        # Each answer names its batch's size n: a batch of n appears n times. The service pads
        # a batch to the next power of two, so it embeds pow2(n) images for n queries.
        n = np.asarray(batch_sizes, np.float64)
        pow2 = 2.0 ** np.ceil(np.log2(n))
        out.update(mean_batch=float(len(n) / np.sum(1 / n)),
                   padded_per_query=float(np.sum(pow2 / n) / len(n)))
    if server_ms:
        keys = sorted({k for t in server_ms for k in t})
        out["server_timings_ms_median"] = {
            k: float(np.median([t[k] for t in server_ms if k in t])) for k in keys}
    return out


def run_server(srv: Server, bodies: list[bytes], levels: list[int], args,
               timings: bool) -> dict:
    res = dict(cmd=shlex.join(srv.cmd), port=srv.port, log=os.path.relpath(srv.log_path, ROOT))
    res["startup_s"] = srv.wait_ready(args.startup_timeout)
    cpu, rss = srv.usage()
    res["rss_mib_ready"] = rss
    print(f"# {srv.name}: ready in {res['startup_s']:.1f}s, {rss:.0f} MiB", flush=True)
    wait_quiet(args.wait_quiet, f"{srv.name} first query")
    res["first"] = asyncio.run(one_query(srv.port, bodies[0], args.api_key, args.client))
    print(f"# {srv.name}: first query {res['first']['ms']:.1f} ms "
          f"(status {res['first']['status']})", flush=True)
    top = []
    for b in bodies[:args.agree]:
        q = asyncio.run(one_query(srv.port, b, args.api_key, args.client))
        top.append([r["id"] for r in q["body"].get("results", [])] if q["status"] == 200
                   else None)
    res["top_ids"] = top
    res["levels"] = []
    for conc in levels:
        waited = wait_quiet(args.wait_quiet, f"{srv.name} c={conc}")
        lv = asyncio.run(closed_loop(srv.port, bodies, conc, args, timings, srv.usage))
        lv.update(server_alive=srv.alive(), waited_quiet_s=waited)
        res["levels"].append(lv)
        print(f"# {srv.name} c={conc}: {lv['qps']:.1f} q/s, p50 {lv['p50_ms']:.1f} "
              f"p99 {lv['p99_ms']:.1f} ms, 200 {lv['ok']}, 503 {lv['n503']}, other "
              f"{lv['other']} {lv['codes']} {lv['exceptions']}; cores: server "
              f"{lv['server_cores']:.2f}, client {lv['client_cores']:.2f}, others "
              f"{lv['other_cores']:.2f}; {lv['rss_mib']:.0f} MiB", flush=True)
        if not srv.alive():
            res["died"] = srv.log_tail()
            print(f"# {srv.name} died:\n{res['died']}", flush=True)
            break
    res["peak_rss_mib"] = peak_rss(srv.proc.pid)
    return res


# ----------------------------------------------------------------------------- report

def fmt(v, spec=".1f") -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def level(res: dict | None, conc: int) -> dict | None:
    if not res:
        return None
    return next((lv for lv in res.get("levels", []) if lv["clients"] == conc), None)


def report(r: dict) -> str:
    ours, peer, ceil, cli = r.get("ours"), r.get("peer"), r["ceiling"], r.get("search_cli")
    L = [f"# Serving benchmark: {r['workdir']} ({r['model']}, gallery {r['gallery_size']})", "",
         f"`{r['command']}`", "",
         f"{r['date']}; git {r['git']}; {r['cpu']}, nproc {r['nproc']}; jax {r['jax']}; "
         f"loopback client "
         f"({r['client_desc']}, one asyncio process); k={r['k']}; {r['num_queries']} query "
         f"files ({r['query_source']}) sent as their own bytes, cycled; per level "
         f"{r['warmup']:g} s warm-up then {r['seconds']:g} s timed, closed loop "
         f"(503: wait Retry-After, at most {r['max_backoff']:g} s). Load average at the start "
         f"{r['loadavg_start'][0]:.2f}; 'other cores': CPU used meanwhile by processes other "
         f"than the server and this client (a quiet machine shows ~0).", ""]
    L += ["| server | clients | queries/s | p50 ms | p95 ms | p99 ms | max ms | 200 | 503 "
          "| other | server cores | client cores | other cores | server RSS MiB |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in (("facejax serve", ours), ("dlib-bin peer", peer)):
        for lv in (res or {}).get("levels", []):
            L.append(f"| {name} | {lv['clients']} | {lv['qps']:.1f} | {fmt(lv['p50_ms'])} | "
                     f"{fmt(lv['p95_ms'])} | {fmt(lv['p99_ms'])} | {fmt(lv['max_ms'])} | "
                     f"{lv['ok']} | {lv['n503']} | {lv['other']} | {lv['server_cores']:.2f} | "
                     f"{lv['client_cores']:.2f} | {lv['other_cores']:.2f} | {lv['rss_mib']:.0f} |")
    if ours and any("server_timings_ms_median" in lv for lv in ours["levels"]):
        keys = ("decode", "queue", "embed", "search", "total")
        L += ["", "Our service's own `timings_ms`, medians per level:", "",
              "| clients | " + " | ".join(f"{k} ms" for k in keys)
              + " | client p50 ms | mean batch | embedded images per query |",
              "|---:|" + "---:|" * (len(keys) + 3)]
        for lv in ours["levels"]:
            t = lv.get("server_timings_ms_median", {})
            L.append(f"| {lv['clients']} | " + " | ".join(fmt(t.get(k), ".2f") for k in keys)
                     + f" | {fmt(lv['p50_ms'], '.2f')} | {fmt(lv.get('mean_batch'))} | "
                     f"{fmt(lv.get('padded_per_query'), '.2f')} |")
        L += ["", "(embedded images per query: the batch padded to a power of two, per query "
              "answered; 1.00 = no padding)"]
    L += ["", "| measure | value |", "|---|---:|"]
    c1 = level(ours, 1)
    if ours:
        f = ours["first"]
        ratio = f" ({f['ms'] / c1['p50_ms']:.2f}x the p50 at 1 client)" if c1 else ""
        L.append(f"| our first query after ready (status {f['status']}) | {f['ms']:.1f} ms"
                 f"{ratio} |")
        if c1:
            L.append(f"| our p50 at 1 client | {c1['p50_ms']:.1f} ms |")
        L.append(f"| our startup, spawn to ready | {ours['startup_s']:.1f} s |")
        L.append(f"| our RSS at ready / after the last level / peak | "
                 f"{ours['rss_mib_ready']:.0f} / "
                 f"{ours['levels'][-1]['rss_mib'] if ours['levels'] else 0:.0f} / "
                 f"{fmt(ours.get('peak_rss_mib'), '.0f')} MiB |")
    if peer:
        p1 = level(peer, 1)
        L.append(f"| peer first query after ready (status {peer['first']['status']}) | "
                 f"{peer['first']['ms']:.1f} ms |")
        if p1:
            L.append(f"| peer p50 at 1 client | {p1['p50_ms']:.1f} ms |")
    if cli:
        L.append(f"| `scripts/search.py` one query, whole process, median of "
                 f"{len(cli['wall_s'])} | {cli['median_s']:.2f} s |")
    L.append(f"| offline ceiling: embed_array on decoded images (batch {ceil['batch']}, "
             f"{ceil['images']} images, best of {sum(map(len, ceil['runs'].values()))}) | "
             f"{ceil['images_per_s']:.1f} img/s (using {ceil['cores']:.2f} cores; other "
             f"cores meanwhile {ceil['other_cores']:.2f}) |")
    if r.get("ceiling_after"):
        a = r["ceiling_after"]
        L.append(f"| the same, measured again after the servers (drift check) | "
                 f"{a['images_per_s']:.1f} img/s (other cores {a['other_cores']:.2f}) |")
    L.append(f"| decode of the query files, one thread | {ceil['decode_ms_per_image']:.2f} "
             f"ms/image |")
    if ours:
        for lv in ours["levels"]:
            L.append(f"| ours at {lv['clients']} / offline ceiling | "
                     f"{lv['qps'] / ceil['images_per_s']:.2f} |")
    if ours and peer:
        for lv in ours["levels"]:
            pl = level(peer, lv["clients"])
            if pl and pl["qps"] > 0:
                L.append(f"| ours / peer at {lv['clients']} clients | "
                         f"{lv['qps'] / pl['qps']:.2f}x |")
    if r.get("agreement"):
        L.append(f"| same top-{r['k']} ids | {r['agreement']} |")
    if ours:
        L += ["", "Targets (TARGETS.md, Serving; stated for the dlib model on 2 cores):", "",
              "| target | measured | met |", "|---|---|---|"]
        for row in targets(ours, peer, ceil):
            L.append(f"| {row[0]} | {row[1]} | {row[2]} |")
    return "\n".join(L) + "\n"


def targets(ours: dict, peer: dict | None, ceil: dict) -> list[tuple[str, str, str]]:
    rows = []
    yes = lambda ok: "yes" if ok else "**no**"
    c1, c32, c128 = level(ours, 1), level(ours, 32), level(ours, 128)
    if c1:
        rows.append(("single-query p50 ≤ 25 ms", f"{c1['p50_ms']:.1f} ms",
                     yes(c1["p50_ms"] <= 25)))
        f = ours["first"]["ms"]
        rows.append(("first query after ready ≤ 2x steady p50", f"{f / c1['p50_ms']:.2f}x",
                     yes(f <= 2 * c1["p50_ms"])))
    if c32:
        x = c32["qps"] / ceil["images_per_s"]
        rows.append(("32 clients ≥ 0.85x offline embed, p99 < 500 ms",
                     f"{x:.2f}x, p99 {c32['p99_ms']:.0f} ms",
                     yes(x >= 0.85 and c32["p99_ms"] < 500)))
        p32 = level(peer, 32)
        if p32 and p32["qps"] > 0:
            x = c32["qps"] / p32["qps"]
            rows.append(("≥ 5x the dlib-bin FastAPI peer (32 clients)", f"{x:.1f}x",
                         yes(x >= 5)))
    if c128:
        rows.append(("128 clients: nothing but deliberate 503s",
                     f"{c128['n503']} x 503, {c128['other']} other",
                     yes(c128["other"] == 0 and c128["empty_results"] == 0
                         and c128["n503_no_retry_after"] == 0)))
    return rows


# ----------------------------------------------------------------------------- main

def _terminated(signum, frame):
    print("bench/serve.py: terminated (SIGTERM); stopping the servers", file=sys.stderr,
          flush=True)
    sys.exit(143)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--levels", default="1,8,32,128", help="concurrent clients, comma-separated")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before each level")
    p.add_argument("--max_requests", type=int, default=0,
                   help="also stop a level after this many requests (0: no limit)")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help="also bench bench/serve_peer_dlib.py (default: for dlib_resnet runs)")
    p.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True,
                   help="bench scripts/serve.py (--no-ours: the peer alone)")
    p.add_argument("--search-cli", dest="search_cli", action=argparse.BooleanOptionalAction,
                   default=True, help="time scripts/search.py processes")
    p.add_argument("--cli_runs", type=int, default=3)
    p.add_argument("--port", type=int, default=8100, help="our service's port")
    p.add_argument("--peer_port", type=int, default=0, help="default: --port + 1")
    p.add_argument("--server_args", default="", help="extra scripts/serve.py flags")
    p.add_argument("--api_key", default=os.environ.get("FACEJAX_BENCH_API_KEY", ""),
                   help="sent as X-API-Key if the service wants one")
    p.add_argument("--client", default="raw", choices=("raw", "httpx"),
                   help="raw: one keep-alive asyncio connection per client; httpx: AsyncClient")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", default="", help="a folder of query images (default: the run's)")
    p.add_argument("--num_queries", type=int, default=500)
    p.add_argument("--agree", type=int, default=20,
                   help="queries whose top-k ids are compared between the servers")
    p.add_argument("--ceiling_images", type=int, default=512)
    p.add_argument("--ceiling_batch", default="32,256")
    p.add_argument("--ceiling_runs", type=int, default=2)
    p.add_argument("--ceiling_after", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the ceiling once more after the servers (machine drift)")
    p.add_argument("--max_backoff", type=float, default=1.0,
                   help="longest wait after a 503 (its Retry-After, capped)")
    p.add_argument("--wait_quiet", type=float, default=0.0,
                   help="before each measurement, wait up to this many seconds for 3 idle "
                        "seconds (a shared machine)")
    p.add_argument("--startup_timeout", type=float, default=300.0)
    p.add_argument("--out", default="", help="report path (default bench/out/serve_NAME.md)")
    args = p.parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    signal.signal(signal.SIGTERM, _terminated)  # so that `finally` stops the servers

    import httpx
    import jax

    from facejax.retrieval.embed import read_embedder_meta
    from facejax.retrieval.index import read_manifest
    from facejax.retrieval.workdir import EMBEDDER_DIR, INDEX_DIR, read_run_config

    workdir = os.path.abspath(args.workdir)
    name = os.path.basename(os.path.normpath(workdir))
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    config = read_run_config(workdir)
    meta = read_embedder_meta(os.path.join(workdir, EMBEDDER_DIR))
    manifest = read_manifest(os.path.join(workdir, INDEX_DIR))
    model = meta.get("model", "?")
    want_peer = model == "dlib_resnet" if args.peer is None else args.peer
    if want_peer and model != "dlib_resnet":
        raise SystemExit(f"--peer needs a dlib_resnet run; {workdir} holds {model}")
    md = args.out or os.path.join(OUT_DIR, f"serve_{name}.md")
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    stem = os.path.splitext(md)[0]
    gallery = manifest.get("count", "?")
    r = dict(command=shlex.join([os.path.relpath(sys.executable, ROOT)
                                 if sys.executable.startswith(ROOT) else sys.executable,
                                 "bench/serve.py"] + (argv if argv is not None
                                                      else sys.argv[1:])),
             date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             cpu=machine(), nproc=os.cpu_count(), jax=jax.__version__,
             httpx=httpx.__version__, client=args.client,
             client_desc=("httpx AsyncClient " + httpx.__version__ if args.client == "httpx"
                          else "keep-alive HTTP/1.1 over asyncio streams, a connection per "
                               "client"), workdir=os.path.relpath(workdir, ROOT)
             if workdir.startswith(ROOT) else workdir, model=model, gallery_size=gallery,
             k=args.k, levels=levels, seconds=args.seconds, warmup=args.warmup,
             max_backoff=args.max_backoff, loadavg_start=os.getloadavg(), git=git_state())
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="facejax_bench_serve_") as tmp:
        try:
            files = query_files(workdir, config, args.num_queries, tmp, args.queries)
            r.update(num_queries=len(files), query_source=args.queries or (
                "idx test split, written as PNG" if config.data.source == "idx"
                else config.data.root), first_query=files[0])
            bodies = [multipart(f, args.k) for f in files]
            wait_quiet(args.wait_quiet, "ceiling")
            r["ceiling"] = offline_ceiling(workdir, config, files, args.ceiling_images,
                                           [int(b) for b in args.ceiling_batch.split(",")],
                                           args.ceiling_runs)
            if args.search_cli:
                wait_quiet(args.wait_quiet, "search.py")
                r["search_cli"] = search_cli(workdir, files[0], args.k, args.cli_runs)
            if args.ours:
                ours = Server("ours", [sys.executable, "scripts/serve.py", "--workdir",
                                       workdir, "--host", HOST, "--port", str(args.port)]
                              + shlex.split(args.server_args), args.port,
                              f"{stem}_server.log")
                servers.append(ours)
                r["ours"] = run_server(ours, bodies, levels, args, timings=True)
                ours.stop()
            if want_peer:
                port = args.peer_port or args.port + 1
                peer = Server("peer", [sys.executable, "bench/serve_peer_dlib.py", "--workdir",
                                       workdir, "--port", str(port)], port, f"{stem}_peer.log")
                servers.append(peer)
                r["peer"] = run_server(peer, bodies, levels, args, timings=False)
                peer.stop()
            if args.ceiling_after:
                wait_quiet(args.wait_quiet, "ceiling again")
                r["ceiling_after"] = offline_ceiling(
                    workdir, config, files, args.ceiling_images, [r["ceiling"]["batch"]], 1)
        finally:
            for s in servers:
                s.stop()
    top = {k: r[k]["top_ids"] for k in ("ours", "peer") if k in r}
    agree = []
    if "ours" in top and "peer" in top:
        same = sum(a == b and a is not None for a, b in zip(top["ours"], top["peer"]))
        agree.append(f"ours vs peer {same}/{len(top['ours'])} queries")
    if "ours" in top and r.get("search_cli") and top["ours"]:
        agree.append("ours vs search.py on the first query "
                     f"{'yes' if top['ours'][0] == r['search_cli']['top_ids'] else 'NO'}")
    r["agreement"] = "; ".join(agree)
    text = report(r)
    print("\n" + text)
    with open(md, "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(r, f, indent=1)
    print(f"written: {os.path.relpath(md, ROOT)}, {os.path.relpath(stem, ROOT)}.json", flush=True)


if __name__ == "__main__":
    main()
