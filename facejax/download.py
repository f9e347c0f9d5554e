"""Resumable downloads checked against a published sha256.

A download goes to `<dest>.part`; an interrupted one continues from where it stopped (HTTP
Range) when the server allows it, and starts over when it does not. The file takes its final
name only once its sha256 matches. Offline, the error says what to fetch and where to put it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request

from facejax.errors import DataError

_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch(urls: list[str], dest: str, sha256: str, *, what: str, progress: bool = True) -> str:
    """`dest`, downloaded from the first of `urls` that answers, unless it is already there
    with the right sha256. Raises DataError (offline, a wrong checksum) with what to do."""
    if os.path.isfile(dest):
        if sha256_file(dest) == sha256:
            return dest
        os.replace(dest, dest + ".bad")
        print(f"note: {dest} has the wrong sha256; moved aside to {dest}.bad", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    errors = []
    for url in urls:
        try:
            _download(url, dest + ".part", what, progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
            continue
        got = sha256_file(dest + ".part")
        if got != sha256:
            os.remove(dest + ".part")  # a corrupt or foreign file: never resume from it
            errors.append(f"{url}: sha256 {got[:16]}..., expected {sha256[:16]}...")
            continue
        os.replace(dest + ".part", dest)
        return dest
    raise DataError(f"cannot download {what} ({'; '.join(errors)}). Fetch it yourself from "
                    f"{urls[0]} (sha256 {sha256}), put it at {os.path.abspath(dest)}, and run "
                    f"the same command again")


def _download(url: str, part: str, what: str, progress: bool) -> None:
    from tqdm import tqdm

    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: the part is already whole (or longer): check it as it is
            raise
        return
    with response:
        resumed = have and response.status == 206
        if not resumed:
            have = 0
        total = response.headers.get("Content-Length")
        total = have + int(total) if total and total.isdigit() else None
        with open(part, "ab" if resumed else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=what,
                disable=not progress, leave=False) as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                f.write(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
        if total is not None and os.path.getsize(part) < total:
            raise OSError(f"the connection closed after {os.path.getsize(part)} of {total} "
                          f"bytes; run again to resume")
