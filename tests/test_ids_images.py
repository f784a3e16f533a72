"""Identifier validation and the image input rule (decode, convert, refuse)."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.errors import InvalidId, InvalidImage, InvalidInput, PayloadTooLarge, ReservedRecipe
from engine.images import MIN_SIDE, decode_image, from_array, resize_square
from engine.validate import MAX_ID_LENGTH, check_filename, check_id, check_recipe
from tests.support import png_header_only

MAX_PIXELS = 64_000_000

# --- ids --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["top", "ROI_01", "a-b.c", "0", "cam2.roi-3_x", "x" * MAX_ID_LENGTH, "console"])
def test_good_ids_pass(value: str) -> None:
    assert check_id("role_id", value) == value


@pytest.mark.parametrize(
    "value",
    ["", "../x", "..", ".", "a/b", "a\\b", "/abs", "a\x00b", "x" * 10_000, "x" * (MAX_ID_LENGTH + 1), "é",
     "roi\u2044a", "CON", "con", "con.txt", "COM1", "lpt9.png", "nul", ".hidden", "a..b", "a.", "-a", "_a",
     " a", "a b", "a\n", "a:b", "a*b"],
)
def test_bad_ids_are_invalid(value: str) -> None:
    with pytest.raises(InvalidId) as info:
        check_id("roi_id", value)
    assert info.value.status == 400 and info.value.code == "invalid_id"
    assert "roi_id" in str(info.value)


@pytest.mark.parametrize("value", [None, 5, b"top", ["top"]])
def test_non_string_ids_are_invalid(value: object) -> None:
    with pytest.raises(InvalidId, match="must be a string"):
        check_id("role_id", value)


def test_filenames() -> None:
    assert check_filename("my image 01.png") == "my image 01.png"
    for bad in ("../a.png", "a/b.png", "a.png ", "", "CON.png", "a\x00.png", " a.png"):
        with pytest.raises(InvalidId):
            check_filename(bad)


@pytest.mark.parametrize("value", [None, "", "default"])
def test_default_recipe_is_none(value: str | None) -> None:
    assert check_recipe(value) is None


@pytest.mark.parametrize("value", ["last", "LAST", "Last"])
def test_recipe_last_is_reserved(value: str) -> None:
    with pytest.raises(ReservedRecipe, match="reserved") as info:
        check_recipe(value)
    assert isinstance(info.value, InvalidInput) and info.value.code == "reserved_recipe"


def test_recipe_ids() -> None:
    assert check_recipe("partA-v2") == "partA-v2"
    assert check_recipe("last2") == "last2"
    with pytest.raises(InvalidId):
        check_recipe("../other")


# --- images: formats ------------------------------------------------------------------------------


@pytest.fixture
def rgb() -> np.ndarray:
    """(12, 16, 3) uint8 seeded RGB."""
    return np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_round_trip(rgb: np.ndarray, fmt: str) -> None:
    out = decode_image(_encode(Image.fromarray(rgb), fmt), MAX_PIXELS)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, rgb)


def test_png_written_by_opencv_is_rgb(rgb: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", rgb[:, :, ::-1])            # OpenCV writes BGR
    assert ok
    np.testing.assert_array_equal(decode_image(buf.tobytes(), MAX_PIXELS), rgb)


def test_16_bit_rgb_and_interlaced_png() -> None:
    """The PNG decoder's other layouts: 16 bits per channel (rounded to 8) and Adam7 interlacing."""
    deep = np.random.default_rng(3).integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    ok, buf = cv2.imencode(".png", deep[:, :, ::-1])
    assert ok
    expected = ((deep.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(buf.tobytes(), MAX_PIXELS), expected)
    adam7 = _adam7_png(expected)                   # Pillow and OpenCV write no interlaced PNG
    assert Image.open(io.BytesIO(adam7)).info.get("interlace") == 1
    np.testing.assert_array_equal(decode_image(adam7, MAX_PIXELS), expected)


def _adam7_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG with Adam7 interlacing (passes written with filter 0)."""
    height, width = rgb.shape[:2]
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)]
    data = b""
    for y0, x0, dy, dx in passes:
        part = rgb[y0::dy, x0::dx]
        if part.size:
            data += b"".join(b"\x00" + row.tobytes() for row in part)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def test_jpeg_round_trip_is_close() -> None:
    flat = np.zeros((16, 16, 3), np.uint8)
    flat[:, :] = (200, 40, 90)
    out = decode_image(_encode(Image.fromarray(flat), "JPEG", quality=95), MAX_PIXELS)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - flat).max() <= 4


def test_gray_is_replicated(rgb: np.ndarray) -> None:
    gray = rgb[:, :, 0]
    for fmt in ("PNG", "BMP", "TIFF"):
        out = decode_image(_encode(Image.fromarray(gray, "L"), fmt), MAX_PIXELS)
        assert out.shape == (12, 16, 3)
        for c in range(3):
            np.testing.assert_array_equal(out[:, :, c], gray)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_rgba_drops_alpha(rgb: np.ndarray, fmt: str) -> None:
    alpha = np.full((12, 16, 1), 7, np.uint8)
    out = decode_image(_encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"), fmt), MAX_PIXELS)
    np.testing.assert_array_equal(out, rgb)


def test_gray_alpha_png(rgb: np.ndarray) -> None:
    la = np.stack([rgb[:, :, 1], np.full((12, 16), 99, np.uint8)], axis=2)
    out = decode_image(_encode(Image.fromarray(la, "LA"), "PNG"), MAX_PIXELS)
    np.testing.assert_array_equal(out, np.repeat(rgb[:, :, 1:2], 3, axis=2))


def test_palette_png(rgb: np.ndarray) -> None:
    pal = Image.fromarray(rgb).quantize(colors=16)
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(decode_image(_encode(pal, "PNG"), MAX_PIXELS), expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_gray_scaled_to_8_bit(fmt: str) -> None:
    levels = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) % 256     # 0..255
    img = Image.fromarray(levels * 257)                                     # 257 * k -> k exactly
    assert img.mode == "I;16"
    out = decode_image(_encode(img, fmt), MAX_PIXELS)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out[:, :, 0], levels.astype(np.uint8))
    np.testing.assert_array_equal(out[:, :, 2], levels.astype(np.uint8))


def test_cmyk_jpeg_is_converted() -> None:
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8] = (255, 0, 0, 0)                # cyan
    cmyk[:, 8:] = (0, 0, 0, 0)                  # white
    data = _encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, MAX_PIXELS)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.abs(out[4, 2].astype(int) - (0, 255, 255)).max() <= 8
    assert np.abs(out[4, 13].astype(int) - (255, 255, 255)).max() <= 8


def test_accepts_bytearray_and_memoryview(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "PNG")
    np.testing.assert_array_equal(decode_image(bytearray(data), MAX_PIXELS), rgb)
    np.testing.assert_array_equal(decode_image(memoryview(data), MAX_PIXELS), rgb)


# --- images: refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(30_000, 30_000), (10_000, 8_000)])
def test_huge_declared_size_is_payload_too_large_before_decode(width: int, height: int) -> None:
    data = png_header_only(width, height)
    assert len(data) < 200
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(data, MAX_PIXELS)
    assert info.value.status == 413


def test_pixel_limit_applies_to_real_images(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "PNG")
    with pytest.raises(PayloadTooLarge, match="16x12"):
        decode_image(data, 12 * 16 - 1)
    assert decode_image(data, 12 * 16).shape == (12, 16, 3)


def test_corrupt_pixel_data_with_small_header_is_invalid() -> None:
    with pytest.raises(InvalidImage):
        decode_image(png_header_only(64, 64), MAX_PIXELS)


@pytest.mark.parametrize("data", [b"", b"\x00", b"not an image at all",
                                  bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
                                  b"GIF89a" + b"\x00" * 64])
def test_garbage_is_invalid_image(data: bytes) -> None:
    with pytest.raises(InvalidImage) as info:
        decode_image(data, MAX_PIXELS)
    assert info.value.code == "invalid_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_truncated_files_are_invalid_image(fmt: str) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 2], MAX_PIXELS)


def test_gif_is_not_supported() -> None:
    data = _encode(Image.fromarray(np.zeros((16, 16), np.uint8), "L"), "GIF")
    with pytest.raises(InvalidImage, match="not a supported image"):
        decode_image(data, MAX_PIXELS)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (MIN_SIDE - 1, 64), (64, MIN_SIDE - 1)])
def test_tiny_images_are_invalid(h: int, w: int) -> None:
    data = _encode(Image.fromarray(np.zeros((h, w, 3), np.uint8)), "PNG")
    with pytest.raises(InvalidImage, match="too small"):
        decode_image(data, MAX_PIXELS)
    with pytest.raises(InvalidImage, match="too small"):
        from_array(np.zeros((h, w, 3), np.uint8), MAX_PIXELS)


def test_smallest_accepted_side() -> None:
    data = _encode(Image.fromarray(np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8)), "PNG")
    assert decode_image(data, MAX_PIXELS).shape == (MIN_SIDE, MIN_SIDE, 3)


# --- raw arrays -------------------------------------------------------------------------------------


def test_from_array_layouts(rgb: np.ndarray) -> None:
    np.testing.assert_array_equal(from_array(rgb, MAX_PIXELS), rgb)
    gray = rgb[:, :, 0]
    expected_gray = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(from_array(gray, MAX_PIXELS), expected_gray)
    np.testing.assert_array_equal(from_array(gray[:, :, None], MAX_PIXELS), expected_gray)
    rgba = np.concatenate([rgb, np.zeros((12, 16, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(from_array(rgba, MAX_PIXELS), rgb)
    # non-contiguous input (a flipped view) comes back contiguous and equal
    out = from_array(rgb[:, ::-1], MAX_PIXELS)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, rgb[:, ::-1])


def test_from_array_uint16_scaled() -> None:
    levels = (np.arange(8 * 8, dtype=np.uint16).reshape(8, 8) * 4)                # 0..252
    out = from_array(levels * 257, MAX_PIXELS)
    np.testing.assert_array_equal(out[:, :, 1], levels.astype(np.uint8))
    assert from_array(np.full((8, 8), 65535, np.uint16), MAX_PIXELS).max() == 255


@pytest.mark.parametrize(
    "array",
    [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8, 3), np.int64), np.zeros((8, 8, 2), np.uint8),
     np.zeros((8, 8, 3, 1), np.uint8), np.zeros(64, np.uint8), [[0] * 8] * 8],
)
def test_from_array_bad_dtype_or_shape(array: object) -> None:
    with pytest.raises(InvalidImage):
        from_array(array, MAX_PIXELS)  # type: ignore[arg-type]


def test_from_array_pixel_limit() -> None:
    with pytest.raises(PayloadTooLarge):
        from_array(np.zeros((10, 10, 3), np.uint8), 99)


def test_resize_square() -> None:
    img = np.zeros((40, 20, 3), np.uint8)
    img[:20] = 200
    out = resize_square(img, 10)
    assert out.shape == (10, 10, 3)
    assert out[:5].min() == 200 and out[5:].max() == 0          # area averaging keeps the halves
    assert resize_square(out, 10) is out
    assert resize_square(np.zeros((4, 4, 3), np.uint8), 16).shape == (16, 16, 3)
