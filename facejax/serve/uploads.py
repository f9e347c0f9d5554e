"""Uploaded images: the content decides the format (never the name), with size limits."""

from __future__ import annotations

import numpy as np

from facejax.data.decode import BadImage, decode_bytes, fit_array, read_rgb_bytes

# Magic numbers of the raster formats the service takes (decode.SAFE_FORMATS, less TIFF).
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP, PGM/PPM"


class UploadError(Exception):
    """A request's image that the service refuses; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def sniff(data: bytes) -> str | None:
    """The file extension for `data`'s format from its first bytes, or None."""
    for magic, ext in _SIGNATURES:
        if data.startswith(magic):
            return ext
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) >= 3 and data[0:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
        return "pgm" if data[1:2] in b"25" else ("pbm" if data[1:2] in b"14" else "ppm")
    return None


def check_upload(data: bytes, what: str, max_bytes: int) -> str:
    """Raises UploadError unless `data` is a non-empty image of an accepted format within
    `max_bytes`; returns its extension."""
    if not data:
        raise UploadError(400, f"{what} is empty (0 bytes)")
    if len(data) > max_bytes:
        raise UploadError(413, f"{what} has {len(data)} bytes; the limit is {max_bytes}")
    ext = sniff(data)
    if ext is None:
        raise UploadError(415, f"{what} is not an image this service reads ({ACCEPTED}); "
                               f"the content decides, not the file name")
    return ext


def decode_upload(data: bytes, what: str, *, size: int, mode: str, max_pixels: int,
                  max_bytes: int, face_crop=(), aligner=None) -> np.ndarray:
    """An upload as the embedder's input: uint8 [size, size, 3].

    With `aligner` (a `FaceAligner`), the largest face is found and aligned first (a dlib
    chip, which needs no face_crop); no face is a 422.
    """
    check_upload(data, what, max_bytes)
    try:
        if aligner is None:
            return decode_bytes(data, size, mode, max_pixels, face_crop)
        chip = aligner.align(read_rgb_bytes(data, max_pixels))
    except BadImage as e:
        status = 413 if e.reason == "too large" else 422
        raise UploadError(status, f"{what}: {e}") from None
    if chip is None:
        raise UploadError(422, f"{what}: no face found to align")
    return fit_array(chip, size, mode)
