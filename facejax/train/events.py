"""TensorBoard scalar event files without TensorFlow: TFRecord framing of hand-encoded protobufs.

Neither tensorboard, tensorboardX nor TensorFlow is a dependency; scalars need only the
`Event{wall_time, step, summary{value{tag, simple_value}}}` message, which is a few bytes of
protobuf wire format. TensorBoard (or `tensorboard --logdir workdir/events`) reads the files.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str = "",
           scalars: dict[str, float] | None = None) -> bytes:
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5)
                         + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


def record(data: bytes) -> bytes:
    """One TFRecord: length, masked crc of the length, data, masked crc of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack(
        "<I", _masked_crc(data))


class EventWriter:
    """Appends scalar summaries to a new `events.out.tfevents.*` file under `logdir`."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, "ab")  # noqa: SIM115  (kept open for the run; see close())
        self._f.write(record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._f.write(record(_event(time.time(), int(step), scalars=values)))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) for every scalar in an event file; checks the CRCs (for tests)."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != _masked_crc(data[pos:pos + 8]):
            raise ValueError(f"bad length crc at byte {pos} of {path}")
        body = data[pos + 12:pos + 12 + n]
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != _masked_crc(body):
            raise ValueError(f"bad data crc at byte {pos} of {path}")
        pos += 16 + n
        fields = _parse(body)
        step = fields.get(2, [0])[0]
        for summary in fields.get(5, []):
            for value in _parse(summary).get(1, []):
                v = _parse(value)
                out.append((step, v[1][0].decode(), struct.unpack("<f", v[2][0])[0]))
    return out


def _parse(buf: bytes) -> dict[int, list]:
    """Minimal protobuf wire parser: field number -> list of raw values."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
