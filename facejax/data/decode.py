"""Decode one image file (or array) into the cache format: RGB uint8 [size, size, 3]."""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from facejax import limits
from facejax.errors import ConfigError, DataError

RESIZE_MODES = ("crop", "pad")
# A face_crop box may reach at most one image side beyond each edge of the square: enough for
# any alignment adapter, and it bounds the black canvas a typo (e.g. 100 for 1.00) would need.
FACE_CROP_RANGE = (-1.0, 2.0)
_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees, so the displayed width is the stored height.
_SWAPS_AXES = (5, 6, 7, 8)
# The only PIL decoders a file or upload may reach, whatever its name says: the raster formats
# photos come in. Others (EPS runs Ghostscript, PSD, ICNS, ...) are never tried: "not an image".
SAFE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "WEBP", "PPM", "GIF", "TIFF")  # JPEG covers MPO


class BadImage(DataError):
    """A file that cannot become a training image. `reason` is a short category for summaries."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(path: str, size: int, mode: str = "crop",
                 max_pixels: int = 50_000_000, face_crop=()) -> np.ndarray:
    """Reads an image file and returns np.uint8 [size, size, 3].

    EXIF orientation is applied, any PIL mode becomes RGB (transparency is composited on
    black), and the image is resized keeping its aspect ratio, then center-cropped
    (`mode='crop'`) or padded with black (`mode='pad'`) to a square. A `face_crop` box
    `(top, left, bottom, right)`, in fractions of that square, is then cut out (black where it
    reaches outside the square) and resized to `size` (see `check_face_crop`).

    Raises:
      BadImage: for an empty, unreadable, truncated, corrupt or non-image file, or one with
        more than `max_pixels` pixels (checked from the header, before decoding).
      ConfigError: for an invalid `face_crop`, or `size` above `limits.MAX_IMAGE_SIDE`.
    """
    box = check_face_crop(face_crop)
    _check_args(size, mode)
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file")
        with open(path, "rb") as f:
            return _decode(f, size, mode, max_pixels, box)
    except OSError as e:  # the file itself: missing, a directory, no permission
        raise BadImage("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None


def decode_bytes(data: bytes, size: int, mode: str = "crop",
                 max_pixels: int = 50_000_000, face_crop=()) -> np.ndarray:
    """Like `decode_image`, for an encoded image held in memory (e.g. a tfds record)."""
    box = check_face_crop(face_crop)
    _check_args(size, mode)
    if not data:
        raise BadImage("empty file")
    return _decode(io.BytesIO(data), size, mode, max_pixels, box)


def read_rgb_bytes(data: bytes, max_pixels: int = 50_000_000) -> np.ndarray:
    """Like `read_rgb`, for an encoded image held in memory (e.g. an upload)."""
    if not data:
        raise BadImage("empty file")
    return np.asarray(_open_rgb(io.BytesIO(data), max_pixels, None), dtype=np.uint8)


def read_rgb(path: str, max_pixels: int = 50_000_000) -> np.ndarray:
    """Reads an image file at its own resolution: upright RGB np.uint8 [H, W, 3].

    Same checks and mode handling as `decode_image` (raises BadImage), without any resizing.
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file")
        with open(path, "rb") as f:
            return np.asarray(_open_rgb(f, max_pixels, None), dtype=np.uint8)
    except OSError as e:
        raise BadImage("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None


def fit_array(array: np.ndarray, size: int, mode: str = "crop", face_crop=()) -> np.ndarray:
    """Converts a decoded image array ([H,W], [H,W,1|3|4], any dtype) to the cache format."""
    box = check_face_crop(face_crop)
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise BadImage("unsupported array", f"shape {a.shape}")
    if a.dtype != np.uint8:
        a = _to_uint8(a)
    if a.ndim == 3 and a.shape[-1] == 4:
        return _fit(_drop_alpha(Image.fromarray(a, "RGBA")), size, mode, box)
    return _fit(Image.fromarray(a).convert("RGB"), size, mode, box)


def check_face_crop(face_crop) -> tuple[float, ...]:
    """`()` (whole image) or a valid `(top, left, bottom, right)` box as four floats.

    The box is in fractions of the square image and may reach outside [0, 1] (that part is
    black), within FACE_CROP_RANGE; it needs bottom > top and right > left.

    Raises:
      ConfigError: anything else (wrong length or type, NaN/inf, an empty or flipped box).
    """
    if face_crop is None:
        return ()
    what = ("data.face_crop must be () or (top, left, bottom, right) in fractions of the "
            "square image")
    if isinstance(face_crop, (str, bytes)) or not hasattr(face_crop, "__len__"):
        raise ConfigError(f"{what}, got {face_crop!r}")
    values = list(face_crop)
    if not values:
        return ()
    if len(values) != 4 or not all(
            isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            for v in values):
        raise ConfigError(f"{what}: four numbers, got {face_crop!r}")
    top, left, bottom, right = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (top, left, bottom, right)):
        raise ConfigError(f"{what}: finite numbers, got {face_crop!r}")
    if bottom <= top or right <= left:
        raise ConfigError(f"{what} with bottom > top and right > left, got {face_crop!r}")
    lo, hi = FACE_CROP_RANGE
    if min(top, left) < lo or max(bottom, right) > hi:
        raise ConfigError(f"{what}, each within [{lo:g}, {hi:g}] (at most one image side "
                          f"beyond an edge), got {face_crop!r}")
    return (top, left, bottom, right)


def _check_args(size: int, mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise DataError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if size < 1:
        raise DataError(f"image size must be positive, got {size}")
    limits.check_size("data.image_size", size)  # before a size x size canvas is allocated


def _decode(fileobj, size: int, mode: str, max_pixels: int, box: tuple) -> np.ndarray:
    rgb = _open_rgb(fileobj, max_pixels, (_decode_side(size, box), mode))
    return _fit(rgb, size, mode, box)


def _decode_side(size: int, box: tuple) -> int:
    """Side of the square that still gives `size` pixels across the face_crop box."""
    if not box:
        return size
    top, left, bottom, right = box
    return max(1, math.ceil(size / min(bottom - top, right - left)))


def _open_rgb(fileobj, max_pixels: int, draft: tuple[int, str] | None) -> Image.Image:
    """Upright RGB image; `draft=(side, mode)` lets JPEG decode at a reduced scale."""
    # PIL raises DecompressionBombError above 2 * MAX_IMAGE_PIXELS inside Image.open; lift its
    # limit so that our own (exact) max_pixels check decides, and silence its warning band.
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fileobj, formats=SAFE_FORMATS)  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise BadImage("too large", str(e)) from None
        except Image.UnidentifiedImageError:
            raise BadImage("not an image") from None
        except Exception as e:  # noqa: BLE001 - a corrupt header can make PIL raise anything
            raise _corrupt(e) from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage("too large", f"{w}x{h} pixels > max_pixels={max_pixels}")
            try:
                im = _load_upright(im, draft)
                return _to_rgb(im)
            except BadImage:
                raise
            except Exception as e:  # noqa: BLE001 - bad data surfaces only when decoding
                raise _corrupt(e) from None


def _corrupt(e: Exception) -> BadImage:
    msg = f"{type(e).__name__}: {e}"
    if isinstance(e, EOFError) or "truncated" in str(e).lower():
        return BadImage("truncated", msg)
    return BadImage("corrupt", msg)


def _load_upright(im: Image.Image, draft: tuple[int, str] | None) -> Image.Image:
    """Decodes the pixels (at reduced JPEG scale when that still covers `draft`'s square side)
    and applies EXIF."""
    orientation = im.getexif().get(_ORIENTATION_TAG, 1) if hasattr(im, "getexif") else 1
    w, h = im.size
    if orientation in _SWAPS_AXES:
        w, h = h, w
    if draft is not None and im.format == "JPEG":
        tw, th = _target_size(w, h, *draft)
        if orientation in _SWAPS_AXES:
            tw, th = th, tw
        # DCT-domain downscaling: decoding a 4000px photo at 1/8 scale is ~10x faster and the
        # result is still at least as large as the resize target.
        im.draft(None, (tw, th))
    im.load()  # LOAD_TRUNCATED_IMAGES stays False, so a truncated file raises here
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _drop_alpha(im.convert("RGBA"))
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _drop_alpha(rgba: Image.Image) -> Image.Image:
    # Transparent pixels become black: that is what the common "convert('RGB')" gives for the
    # usual fully transparent (0,0,0,0) pixels, and it is well defined for partial alpha too.
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Maps a high bit-depth or float image to 0..255 (16-bit by /257; other ranges min-max)."""
    a = np.asarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if np.issubdtype(a.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        return np.round(a * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255 and not np.issubdtype(a.dtype, np.floating):
        return a.astype(np.uint8)
    if lo >= 0 and hi <= 65535 and (a.dtype == np.uint16 or np.issubdtype(a.dtype, np.integer)):
        return np.round(a.astype(np.float64) / 257.0).astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((a.astype(np.float64) - lo) * scale).astype(np.uint8)


def _target_size(w: int, h: int, size: int, mode: str) -> tuple[int, int]:
    """Aspect-preserving size whose short side (crop) or long side (pad) equals `size`."""
    if mode == "crop":
        # Same rounding as torchvision's Resize(int): the long side is truncated.
        if w <= h:
            return (size, max(size, int(size * h / w)))
        return (max(size, int(size * w / h)), size)
    return (size, max(1, round(size * h / w))) if w >= h else (max(1, round(size * w / h)), size)


def _fit(rgb: Image.Image, size: int, mode: str, box: tuple = ()) -> np.ndarray:
    _check_args(size, mode)
    if box:
        return _fit_box(rgb, size, mode, box)
    w, h = rgb.size
    tw, th = _target_size(w, h, size, mode)
    if (w, h) != (tw, th):
        rgb = rgb.resize((tw, th), Image.BILINEAR)  # antialiased when shrinking
    if mode == "crop":
        left, top = round((tw - size) / 2.0), round((th - size) / 2.0)
        if (tw, th) != (size, size):
            rgb = rgb.crop((left, top, left + size, top + size))
        out = np.asarray(rgb, dtype=np.uint8)
    else:
        out = np.zeros((size, size, 3), np.uint8)
        top, left = (size - th) // 2, (size - tw) // 2
        out[top:top + th, left:left + tw] = np.asarray(rgb, dtype=np.uint8)
    return _checked(out, size)


def _fit_box(rgb: Image.Image, size: int, mode: str, box: tuple) -> np.ndarray:
    """The face_crop box of the (crop or pad) square, resized to `size` in one resampling.

    Works at the decoded resolution, so a small box is not cut from an already shrunken
    square. Pixels outside the square are black.
    """
    w, h = rgb.size
    side = min(w, h) if mode == "crop" else max(w, h)
    # The square in image coordinates (pad: it starts before the image, outside is black).
    if mode == "crop":
        sx, sy = round((w - side) / 2.0), round((h - side) / 2.0)
    else:
        sx, sy = -((side - w) // 2), -((side - h) // 2)
    top, left, bottom, right = box
    bx0, by0, bx1, by1 = sx + left * side, sy + top * side, sx + right * side, sy + bottom * side
    # Real content: the image inside the square.
    cx0, cy0, cx1, cy1 = max(0, sx), max(0, sy), min(w, sx + side), min(h, sy + side)
    # The resampling filter reads up to ~scale pixels beyond the box; give it real neighbours
    # where there are some, and black only where the box itself leaves the content.
    margin = math.ceil(max(1.0, (bx1 - bx0) / size)) + 1

    def window(b0, b1, c0, c1):
        lo = math.floor(b0) - margin
        hi = math.ceil(b1) + margin
        return (max(lo, c0) if b0 >= c0 else lo), (min(hi, c1) if b1 <= c1 else hi)

    x0, x1 = window(bx0, bx1, cx0, cx1)
    y0, y1 = window(by0, by1, cy0, cy1)
    canvas = Image.new("RGB", (x1 - x0, y1 - y0))
    vx0, vy0, vx1, vy1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
    if vx1 > vx0 and vy1 > vy0:
        canvas.paste(rgb.crop((vx0, vy0, vx1, vy1)), (vx0 - x0, vy0 - y0))
    out = canvas.resize((size, size), Image.BILINEAR,
                        box=(bx0 - x0, by0 - y0, bx1 - x0, by1 - y0))
    return _checked(np.asarray(out, dtype=np.uint8), size)


def _checked(out: np.ndarray, size: int) -> np.ndarray:
    if out.shape != (size, size, 3):  # defensive: PIL modes we did not anticipate
        raise BadImage("unsupported mode", f"decoded to shape {out.shape}")
    return out
