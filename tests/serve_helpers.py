"""Helpers for the service tests: a tiny real run, and the real server as a subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
from conftest import make_run, write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVE = os.path.join(ROOT, "scripts", "serve.py")
_URL = re.compile(r"at (http://127\.0\.0\.1:\d+)")


def make_serve_run(tmp_path, classes: dict[str, int], size=(20, 16)):
    """(workdir, image_root): an exported colour embedder and a built index over synthetic
    one-colour-per-class images `image_root/<class>/<class>_NNN.png`."""
    from facejax.retrieval import workdir as wd

    root = os.path.join(str(tmp_path), "images")
    write_image_folder(root, classes, size=size)
    work = make_run(tmp_path, root)
    wd.build_workdir_index(work, wd.read_run_config(work), progress=False)
    return work, root


class Server:
    """A `scripts/serve.py` subprocess on a free loopback port; `.url`, `.output()`."""

    def __init__(self, workdir: str, api_keys=("test-key",), extra_args=(), env=None):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full_env["FACEJAX_API_KEYS"] = ",".join(api_keys)
        self.proc = subprocess.Popen(
            [sys.executable, SERVE, "--workdir", workdir, "--port", "0", *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True)
        self.lines: list[str] = []
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.url is None:
                m = _URL.search(self.output())
                self.url = m.group(1) if m else None
            if self.url is not None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                        return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited ({self.proc.returncode}):\n{self.output()}")
            time.sleep(0.1)
        raise RuntimeError(f"serve.py not ready after {timeout} s:\n{self.output()}")

    def kill(self, sig=signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


@contextlib.contextmanager
def start_server(workdir: str, *, api_keys=("test-key",), extra_args=(), env=None):
    """A ready server; it is stopped (SIGTERM, then SIGKILL) when the block ends."""
    server = Server(workdir, api_keys, extra_args, env)
    try:
        yield server.wait_ready()
    finally:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
