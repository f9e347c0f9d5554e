"""scripts/get_lfw.py against a local HTTP server on loopback serving an archive the test builds."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import os
import socket
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from facejax.data import lfw
from facejax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIRS_TEXT = b"1\t1\nAlice\t1\t2\n"


def _jpeg(pixels) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support; the first GET of a name in `cut` stops half-way."""
    files: dict[str, bytes] = {}
    cut: set[str] = set()
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802 - the http.server API
        name = self.path.lstrip("/")
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range"):
            self.ranges.append(self.headers["Range"])
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.cut:
            self.cut.discard(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Files.files, _Files.cut, _Files.ranges = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Files
    httpd.shutdown()
    httpd.server_close()


def _remotes(url, files):
    def remote(name):
        return lfw.Remote(name, (f"{url}/{name}",), hashlib.sha256(files[name]).hexdigest())
    return remote("lfw.tgz"), remote("pairs.txt")


def _script():
    spec = importlib.util.spec_from_file_location("_get_lfw", os.path.join(ROOT, "scripts",
                                                                            "get_lfw.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_download_resumes_checks_unpacks_and_aligns(server, tmp_path, capsys):
    from skimage import data as skdata

    url, handler = server
    face = skdata.astronaut()  # one frontal face
    handler.files = {
        "lfw.tgz": _archive({"lfw/Alice/Alice_0001.jpg": _jpeg(face),
                             "lfw/Alice/Alice_0002.jpg": _jpeg(face[:, ::-1].copy()),
                             "lfw/Bob/Bob_0001.jpg": _jpeg(np.full((250, 250, 3), 90, np.uint8))}),
        "pairs.txt": PAIRS_TEXT,
    }
    handler.cut = {"lfw.tgz"}
    archive, pairs = _remotes(url, handler.files)
    dst = str(tmp_path / "lfw")
    args = ["--dst", dst, "--archive_url", f"{url}/lfw.tgz", "--pairs_url", f"{url}/pairs.txt",
            "--archive_sha256", archive.sha256, "--pairs_sha256", pairs.sha256, "--no_progress"]
    # The connection drops half-way: a clear error, and the half is kept for the next run.
    with pytest.raises(DataError, match="resume"):
        lfw.get_lfw(dst, archive=archive, pairs=pairs, progress=False)
    part = os.path.join(dst, "downloads", "lfw.tgz.part")
    assert 0 < os.path.getsize(part) < len(handler.files["lfw.tgz"])
    assert _script().main(args) == 0
    assert handler.ranges == [f"bytes={len(handler.files['lfw.tgz']) // 2}-"]  # resumed
    assert not os.path.exists(part)
    assert sorted(os.listdir(os.path.join(dst, "raw", "lfw"))) == ["Alice", "Bob"]
    assert open(os.path.join(dst, "pairs.txt"), "rb").read() == PAIRS_TEXT
    chips = sorted(os.listdir(os.path.join(dst, "aligned", "Alice")))
    assert chips == ["Alice_0001.jpg", "Alice_0002.jpg"]
    assert Image.open(os.path.join(dst, "aligned", "Alice", chips[0])).size == (150, 150)
    out = capsys.readouterr().out
    assert "aligned 2 images" in out and "skipped 1" in out  # Bob's grey square has no face
    # A rerun finds everything in place and downloads nothing.
    handler.files = {}
    assert _script().main(args) == 0


def test_offline_and_wrong_checksum_say_what_to_do(server, tmp_path):
    url, handler = server
    handler.files = {"lfw.tgz": _archive({"lfw/A/A_0001.jpg": b"x"}), "pairs.txt": PAIRS_TEXT}
    archive, pairs = _remotes(url, handler.files)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/lfw.tgz"
    offline = lfw.Remote("lfw.tgz", (dead,), archive.sha256)
    dst = tmp_path / "lfw"
    with pytest.raises(DataError) as e:
        lfw.get_lfw(str(dst), archive=offline, pairs=pairs, align=False, progress=False)
    msg = str(e.value)
    assert dead in msg and archive.sha256 in msg and str(dst / "downloads" / "lfw.tgz") in msg
    wrong = lfw.Remote("lfw.tgz", archive.urls, "0" * 64)
    with pytest.raises(DataError, match="sha256"):
        lfw.get_lfw(str(dst), archive=wrong, pairs=pairs, align=False, progress=False)
    assert not os.listdir(dst / "downloads")  # nothing kept from a file that failed its check


def test_archive_members_cannot_escape(server, tmp_path):
    url, handler = server
    handler.files = {"lfw.tgz": _archive({"lfw/A/A_0001.jpg": b"x", "../escaped.txt": b"x"}),
                     "pairs.txt": PAIRS_TEXT}
    archive, pairs = _remotes(url, handler.files)
    with pytest.raises(DataError, match="cannot unpack"):
        lfw.get_lfw(str(tmp_path / "lfw"), archive=archive, pairs=pairs, align=False,
                    progress=False)
    assert not (tmp_path / "escaped.txt").exists()
