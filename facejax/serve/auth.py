"""API keys: only their sha256 hashes are kept, in memory and in the keys file.

Keys come from `$FACEJAX_API_KEYS` (comma-separated) and/or a keys file with one
`sha256:<hex>` per line (`#` comments; `python scripts/serve.py --new_key` prints a key and
its line). A request sends its key as `X-API-Key: KEY` or `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from facejax.errors import ConfigError

ENV_VAR = "FACEJAX_API_KEYS"
_LINE = re.compile(r"sha256:([0-9a-f]{64})")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random key and its keys-file line."""
    key = secrets.token_urlsafe(24)
    return key, f"sha256:{key_hash(key)}"


def read_keys_file(path: str) -> list[str]:
    """The hashes in a keys file; ConfigError for a line that is not a hash."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read the API keys file {path}: {e.strerror or e}") from None
    hashes = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.fullmatch(line.split()[0].lower())
        if m is None:
            raise ConfigError(f"{path} line {number}: expected 'sha256:<64 hex digits>' (the "
                              f"file stores hashes, never keys; see serve.py --new_key)")
        hashes.append(m.group(1))
    return hashes


class ApiKeys:
    def __init__(self, hashes: list[str]):
        self._hashes = [bytes.fromhex(h) for h in hashes]

    @classmethod
    def load(cls, env_value: str | None, keys_file: str | None) -> ApiKeys:
        hashes = [key_hash(k.strip()) for k in (env_value or "").split(",") if k.strip()]
        if keys_file:
            hashes += read_keys_file(keys_file)
        return cls(hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, key: str) -> None:
        self._hashes.append(bytes.fromhex(key_hash(key)))

    def check(self, key: str | None) -> bool:
        if not key:
            return False
        digest = hashlib.sha256(key.encode()).digest()
        ok = False
        for h in self._hashes:  # compare with every hash: the time does not tell which matched
            ok |= hmac.compare_digest(digest, h)
        return ok
