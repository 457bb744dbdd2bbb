"""Preprocessing against an independent reference computation, every common mode, and bad input."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from tests.conftest import jpeg_bytes, photo
from images.pillow_decoder import BadImageError, PreprocessConfig, crop_box, open_image, preprocess_image

EXACT = PreprocessConfig(draft=False)


def _triangle_weights(in_size: int, out_size: int) -> np.ndarray:
    """Antialiased bilinear (triangle filter) resampling matrix (out_size, in_size), float64.

    Written from the definition: output pixel i samples the input around
    (i + 0.5) * scale with a triangle whose support widens with the downscale factor.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    weights = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(math.floor(center - support)), 0)
        hi = min(int(math.ceil(center + support)), in_size)
        xs = np.arange(lo, hi)
        w = np.clip(1.0 - np.abs((xs + 0.5 - center) / support), 0.0, None)
        weights[i, lo:hi] = w / w.sum()
    return weights


def reference(rgb: np.ndarray, resize: int = 256, crop: int = 224, crop_width: int = None) -> np.ndarray:
    """Resize the shorter side to `resize`, centre-crop `crop` rows by `crop_width` columns (default
    `crop`): numpy only, float64 throughout."""
    crop_width = crop if crop_width is None else crop_width
    h, w = rgb.shape[:2]
    scale = resize / min(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    out = np.einsum("yh,hwc->ywc", _triangle_weights(h, new_h), rgb.astype(np.float64))
    out = np.einsum("xw,ywc->yxc", _triangle_weights(w, new_w), out)
    top, left = (new_h - crop) // 2, (new_w - crop_width) // 2
    return np.clip(np.rint(out[top:top + crop, left:left + crop_width]), 0, 255).astype(np.uint8)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["chelsea", "coffee", "astronaut"])
def test_matches_independent_reference(name):
    rgb = photo(name)
    got = preprocess_image(_png(Image.fromarray(rgb)), EXACT)
    want = reference(rgb)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    # Pillow rounds to 8 bits between its horizontal and vertical passes: at most 2 levels apart.
    assert diff.max() <= 2, diff.max()
    assert diff.mean() < 0.5, diff.mean()


def test_portrait_and_non_default_sizes():
    rgb = np.ascontiguousarray(photo("astronaut")[:, 100:400])  # 512 x 300 portrait
    config = PreprocessConfig(resize=160, crop=128, draft=False)
    got = preprocess_image(_png(Image.fromarray(rgb)), config)
    np.testing.assert_allclose(got.astype(int), reference(rgb, 160, 128).astype(int), atol=2)


PHOTOS = {"landscape": lambda: photo("chelsea"),  # 451 wide x 300 high
          "portrait": lambda: np.ascontiguousarray(photo("astronaut")[:, 100:400])}  # 300 wide x 512 high


@pytest.mark.parametrize("shape", [(240, 320), (320, 240)], ids=["wide", "tall"])
@pytest.mark.parametrize("source", sorted(PHOTOS))
def test_non_square_crop_matches_independent_reference(source, shape):
    # A model taking 240 x 320 (height x width): JPEGs as users store them, decoded here once to
    # give the reference its pixels, so the comparison is of resize-and-crop alone.
    height, width = shape
    data = jpeg_bytes(PHOTOS[source]())
    config = PreprocessConfig(resize=320, crop=height, crop_width=width, draft=False)
    assert config.crop_size == (height, width)
    got = preprocess_image(data, config)
    assert got.shape == (height, width, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    want = reference(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 320, height, width)
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 2, diff.max()  # as for square crops: Pillow's 8-bit intermediate
    assert diff.mean() < 0.5, diff.mean()


def test_square_crop_is_the_default_and_an_equal_width_changes_nothing():
    assert PreprocessConfig().crop_size == (224, 224)
    assert PreprocessConfig(crop=128, resize=160).crop_size == (128, 128)
    data = jpeg_bytes(photo("coffee"))
    square, explicit = PreprocessConfig(), PreprocessConfig(crop_width=224)
    np.testing.assert_array_equal(preprocess_image(data, square), preprocess_image(data, explicit))
    assert crop_box(600, 400, square) == crop_box(600, 400, explicit)


def test_crop_box_is_centred_on_both_axes_of_a_non_square_crop():
    # 451 x 300 resized to 481 x 320 (shorter side 320): the 320-wide, 240-high crop keeps
    # columns 80..400 and rows 40..280 of it, in source pixels.
    left, top, right, bottom = crop_box(451, 300, PreprocessConfig(resize=320, crop=240, crop_width=320))
    sx, sy = 451 / 481, 300 / 320
    np.testing.assert_allclose((left, top, right, bottom), (80 * sx, 40 * sy, 400 * sx, 280 * sy))


def test_jpeg_draft_mode_is_close_to_full_decode():
    big = np.asarray(Image.fromarray(photo("chelsea")).resize((1400, 1000), Image.Resampling.BICUBIC))
    data = jpeg_bytes(big, 95)
    full = preprocess_image(data, EXACT).astype(int)
    draft = preprocess_image(data, PreprocessConfig(draft=True)).astype(int)
    diff = np.abs(full - draft)
    assert diff.mean() < 2.0, diff.mean()
    assert np.percentile(diff, 99) < 16


def test_draft_is_not_used_when_it_would_go_under_the_resize():
    data = jpeg_bytes(photo("coffee"))  # 600 x 400: shorter side 400 < 2 * 256
    np.testing.assert_array_equal(preprocess_image(data, PreprocessConfig(draft=True)),
                                  preprocess_image(data, EXACT))


def test_exif_orientation_is_applied():
    rgb = photo("chelsea")
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer must rotate 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(buf, format="PNG", exif=exif.tobytes())
    got = preprocess_image(buf.getvalue(), EXACT).astype(int)
    upright = preprocess_image(_png(Image.fromarray(rgb)), EXACT).astype(int)
    assert np.abs(got - upright).mean() < 1.0
    sideways = preprocess_image(_png(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)), EXACT)
    assert np.abs(sideways.astype(int) - upright).mean() > 10  # the check can fail


def _solid(mode: str, value, size=(300, 300)) -> bytes:
    return _png(Image.new(mode, size, value))


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 100, (100, 100, 100)),
    ("LA", (100, 0), (255, 255, 255)),         # fully transparent -> white background
    ("LA", (100, 255), (100, 100, 100)),
    ("RGBA", (10, 20, 30, 0), (255, 255, 255)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half transparent black over white
    ("1", 1, (255, 255, 255)),
])
def test_modes_convert_to_rgb(mode, value, expected):
    got = preprocess_image(_solid(mode, value), EXACT)
    np.testing.assert_allclose(got.reshape(-1, 3).mean(axis=0), expected, atol=1.0)


def test_palette_with_and_without_transparency():
    image = Image.new("P", (300, 300), 1)
    image.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    np.testing.assert_array_equal(preprocess_image(_png(image), EXACT)[0, 0], (200, 30, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=1)
    np.testing.assert_array_equal(preprocess_image(buf.getvalue(), EXACT)[0, 0], (255, 255, 255))


def test_cmyk_jpeg():
    rgb = photo("coffee")
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    got = preprocess_image(buf.getvalue(), EXACT).astype(int)
    want = preprocess_image(_png(Image.fromarray(rgb)), EXACT).astype(int)
    assert np.abs(got - want).mean() < 6


def test_16_bit_grayscale_keeps_the_top_8_bits():
    gray = np.full((300, 300), 40000, dtype=np.uint16)
    got = preprocess_image(_png(Image.fromarray(gray)), EXACT)  # mode I;16
    np.testing.assert_array_equal(got, np.full((224, 224, 3), 40000 >> 8, dtype=np.uint8))


def test_small_images_are_upscaled():
    got = preprocess_image(_png(Image.new("RGB", (20, 10), (1, 2, 3))), EXACT)
    assert got.shape == (224, 224, 3)
    np.testing.assert_array_equal(got[100, 100], (1, 2, 3))


@pytest.mark.parametrize("data,match", [
    (b"", "empty file \\(0 bytes\\)"),
    (b"hello world, I am text", "not an image: the file holds text"),
    (b"\x00\x01\x02\x03binary junk" * 4, "not a supported image format .* starts with bytes 00 01 02 03"),
])
def test_bad_bytes_are_refused_with_a_reason(data, match):
    with pytest.raises(BadImageError, match=match):
        preprocess_image(data)


def test_truncated_jpeg_is_refused():
    data = jpeg_bytes(photo("astronaut"))
    with pytest.raises(BadImageError, match="truncated or corrupt JPEG data.*re-export"):
        preprocess_image(data[: len(data) // 3])


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png(Image.new("1", (10_000, 10_000)))
    assert len(bomb) < 100_000
    with pytest.raises(BadImageError, match="10000x10000 = 100.0 Mpx, over the pixel limit of 89.5 Mpx"):
        preprocess_image(bomb)
    with pytest.raises(BadImageError, match="over the pixel limit of 0.1 Mpx"):
        preprocess_image(_png(Image.new("RGB", (400, 400))), PreprocessConfig(max_pixels=100_000))


def test_max_pixels_above_pillows_own_limit_is_honoured(monkeypatch):
    # 196 Mpx is over twice Pillow's default limit, where Pillow itself refuses to open it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    big = _png(Image.new("1", (14_000, 14_000)))
    with pytest.raises(BadImageError, match="over the pixel limit"):
        open_image(big, PreprocessConfig())
    assert open_image(big, PreprocessConfig(max_pixels=200_000_000)).size == (14_000, 14_000)
    with pytest.raises(BadImageError, match="196.0 Mpx, over the pixel limit of 150.0 Mpx"):
        open_image(big, PreprocessConfig(max_pixels=150_000_000))


def test_config_is_validated():
    with pytest.raises(ValueError, match="crop <= resize"):
        PreprocessConfig(resize=200, crop=224)
    # The centre crop must fit the resized image's shorter side whichever way round the image is.
    with pytest.raises(ValueError, match=r"crop_width <= resize .*got crop=240 crop_width=320 resize=256"):
        PreprocessConfig(resize=256, crop=240, crop_width=320)
    with pytest.raises(ValueError, match=r"got crop=320 crop_width=240 resize=256"):
        PreprocessConfig(resize=256, crop=320, crop_width=240)
    with pytest.raises(ValueError, match=r"crop_width=0"):
        PreprocessConfig(crop_width=0)
    with pytest.raises(ValueError, match=r"crop=0"):
        PreprocessConfig(crop=0, crop_width=224)
    assert PreprocessConfig(resize=320, crop=240, crop_width=320).crop_size == (240, 320)
    with pytest.raises(ValueError, match="resample"):
        PreprocessConfig(resample="cubic-ish")
