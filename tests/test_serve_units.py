"""The service's request checks without a server: uploads decided by content, API keys by hash.

(test_serve.py runs the real server; these are the fast tier's check of facejax.serve.)
"""

import io

import numpy as np
import pytest
from PIL import Image

from facejax.errors import ConfigError
from facejax.serve.auth import ApiKeys, key_hash, new_key
from facejax.serve.uploads import UploadError, check_upload, decode_upload


def _image_bytes(fmt: str, colour=(200, 40, 10), size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def test_uploads_are_judged_by_their_bytes_and_limits():
    assert check_upload(_image_bytes("PNG"), "image", 10_000) == "png"
    assert check_upload(_image_bytes("JPEG"), "image", 10_000) == "jpg"
    assert check_upload(_image_bytes("BMP"), "image", 10_000) == "bmp"
    cases = [(b"", 400, "empty"), (_image_bytes("PNG"), 413, "the limit is 50"),
             (b"%PDF-1.7 not a picture", 415, "the content decides")]
    for data, status, words in cases:
        with pytest.raises(UploadError, match=words) as err:
            check_upload(data, "image", 50 if status == 413 else 10_000)
        assert err.value.status == status
    # A PNG cut short has the right magic number but no pixels: a 422, not a crash.
    with pytest.raises(UploadError) as err:
        decode_upload(_image_bytes("PNG")[:40], "query", size=8, mode="crop",
                      max_pixels=10_000, max_bytes=10_000)
    assert err.value.status == 422


def test_a_decoded_upload_is_the_embedders_input():
    out = decode_upload(_image_bytes("PNG"), "query", size=8, mode="crop", max_pixels=10_000,
                        max_bytes=10_000)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.broadcast_to(np.uint8([200, 40, 10]), (8, 8, 3)))
    with pytest.raises(UploadError) as err:  # 320 pixels over a 100-pixel bound
        decode_upload(_image_bytes("PNG"), "query", size=8, mode="crop", max_pixels=100,
                      max_bytes=10_000)
    assert err.value.status == 413


def test_api_keys_are_kept_as_hashes_and_checked(tmp_path):
    key, line = new_key()
    assert line == f"sha256:{key_hash(key)}" and key not in line
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# service keys\n{line}  # ops\n\n")
    keys = ApiKeys.load("env-key, ", str(keys_file))
    assert len(keys) == 2
    assert keys.check(key) and keys.check("env-key")
    assert not keys.check("other") and not keys.check("") and not keys.check(None)
    keys.add("late")
    assert keys.check("late")
    keys_file.write_text(f"{line}\n{key}\n")  # a raw key where a hash belongs
    with pytest.raises(ConfigError, match="line 2: expected 'sha256:"):
        ApiKeys.load(None, str(keys_file))
