"""Reads TensorBoard event files back for tests: TFRecord framing (length, masked CRC-32C of
the length, data, masked CRC-32C of the data) checked here, independently of the writer, and
each record parsed as tensorboardX's `Event` protobuf."""

from __future__ import annotations

import struct


def _table() -> list[int]:
    out = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        out.append(crc)
    return out


_TABLE = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str) -> list:
    """Every `Event` in the file, in order; ValueError on a bad CRC or a torn record."""
    from tensorboardX.proto import event_pb2

    with open(path, "rb") as f:
        data = f.read()
    events, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"torn record header at byte {pos} of {path}")
        (n,) = struct.unpack_from("<Q", data, pos)
        if struct.unpack_from("<I", data, pos + 8)[0] != masked_crc(data[pos:pos + 8]):
            raise ValueError(f"bad length crc at byte {pos} of {path}")
        body = data[pos + 12:pos + 12 + n]
        if len(body) != n or pos + 16 + n > len(data):
            raise ValueError(f"torn record at byte {pos} of {path}")
        if struct.unpack_from("<I", data, pos + 12 + n)[0] != masked_crc(body):
            raise ValueError(f"bad data crc at byte {pos} of {path}")
        events.append(event_pb2.Event.FromString(body))
        pos += 16 + n
    return events


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) for every scalar in an event file, in file order."""
    return [(int(e.step), v.tag, float(v.simple_value))
            for e in read_events(path) if e.HasField("summary") for v in e.summary.value]
