"""Image decoding and the input rule: any supported file or pixel buffer -> RGB uint8.

Supported files: PNG, JPEG, BMP, TIFF; gray, RGB, RGBA, palette, CMYK, 16-bit. The pixel count
and the decoded size (width x height x channels x bytes per sample) are checked from the header
before the pixels are decoded (decompression bombs: an 8000x8000 16-bit RGBA PNG of zeros is
487 KB as a file and 512 MiB decoded). ``probe`` reads that header alone, so callers can reserve
the memory an image will take before it is decoded (``engine.budget``).
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from imagecodecs import png_decode
from PIL import Image, UnidentifiedImageError

from engine.errors import InvalidImage, PayloadTooLarge

__all__ = [
    "IMAGE_SUFFIXES", "MIN_SIDE", "SUPPORTED_FORMATS", "ImageHeader", "ImageInput", "ImageLimits", "decode_image",
    "decode_input", "from_array", "probe", "resize_square",
]

SUPPORTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
# file name endings of those formats, wherever images are listed from a folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_SIDE = 8
# what callers may hand the engine as an image: encoded file bytes or a pixel array
ImageInput = bytes | bytearray | memoryview | np.ndarray


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says about its pixels, before any is decoded."""

    width: int
    height: int
    channels: int
    sample_bytes: int          # 1 (8-bit), 2 (16-bit), 4 (32-bit int or float)

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """Width x height x channels x bytes per sample: the decoder's output before conversion."""
        return self.pixels * self.channels * self.sample_bytes

    @property
    def decode_peak_bytes(self) -> int:
        """Memory the decode to RGB uint8 takes at its peak: the decoded pixels, the temporaries of a
        16/32-bit conversion, and the RGB result."""
        per_pixel = self.channels * self.sample_bytes + 6
        if self.sample_bytes > 1:
            per_pixel += self.channels * 5 + 32
        return self.pixels * per_pixel


# PNG colour type -> channels as OpenCV decodes it (a palette becomes 3 channels)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_MODE_SAMPLE_BYTES = {"I": 4, "F": 4, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def probe(image: object) -> ImageHeader | None:
    """The header of encoded bytes or the shape of a pixel array; None when it cannot be read (the
    decoder then reports why)."""
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0:
            return None
        channels = image.shape[2] if image.ndim == 3 else 1
        return ImageHeader(int(image.shape[1]), int(image.shape[0]), int(channels), image.dtype.itemsize)
    if not isinstance(image, bytes | bytearray | memoryview) or len(image) < 33:
        return None
    head = bytes(image[:33])
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
        return ImageHeader(width, height, _PNG_CHANNELS.get(colour, 4), 2 if depth == 16 else 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(image), formats=SUPPORTED_FORMATS)
            width, height = img.size
            channels = len(img.getbands())
            return ImageHeader(width, height, channels, _MODE_SAMPLE_BYTES.get(img.mode, 1))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def _check_header(header: ImageHeader | None, max_pixels: int, max_decoded_bytes: int | None) -> None:
    if header is None:
        return
    if header.pixels > max_pixels:
        raise PayloadTooLarge(
            f"image of {header.width}x{header.height} pixels exceeds the limit of {max_pixels} pixels")
    if max_decoded_bytes is not None and header.decoded_bytes > max_decoded_bytes:
        raise PayloadTooLarge(
            f"image of {header.width}x{header.height} pixels, {header.channels} channels of "
            f"{8 * header.sample_bytes} bits is {header.decoded_bytes} bytes decoded; the limit is "
            f"{max_decoded_bytes}")


@dataclass(frozen=True)
class ImageLimits:
    """The engine's image limits, and the working memory an image will take under them."""

    max_bytes: int
    max_pixels: int
    max_decoded_bytes: int

    def decode(self, image: object, what: str = "image") -> np.ndarray:
        """``decode_input`` within these limits."""
        return decode_input(image, max_bytes=self.max_bytes, max_pixels=self.max_pixels,
                            max_decoded_bytes=self.max_decoded_bytes, what=what)

    def working_bytes(self, image: object, per_pixel: int = 0) -> int:
        """Peak bytes to decode ``image``, plus ``per_pixel`` for each of its pixels (what scoring
        keeps at full size); 0 when its header is unreadable or over the limits (it is refused
        before any pixel is decoded)."""
        header = probe(image)
        if header is None or header.pixels > self.max_pixels or header.decoded_bytes > self.max_decoded_bytes:
            return 0
        return header.decode_peak_bytes + header.pixels * per_pixel


def decode_input(image: object, *, max_bytes: int, max_pixels: int, max_decoded_bytes: int | None = None,
                 what: str = "image") -> np.ndarray:
    """Encoded bytes or a pixel array -> (H, W, 3) uint8 RGB, within the size limits.

    ``what`` names the image in error messages ("image 3" of a fit).

    Raises:
        InvalidImage: not bytes or an array, or not decodable.
        PayloadTooLarge: over ``max_bytes`` encoded bytes, ``max_pixels`` pixels or
            ``max_decoded_bytes`` decoded bytes (from the header, before decoding).
    """
    if isinstance(image, InvalidImage):
        raise image                 # a door could not read this image: its error stands for it
    if isinstance(image, np.ndarray):
        _check_header(probe(image), max_pixels, max_decoded_bytes)
        return from_array(image, max_pixels)
    if not isinstance(image, bytes | bytearray | memoryview):
        raise InvalidImage(f"{what} must be encoded image bytes or a pixel array")
    if len(image) > max_bytes:
        raise PayloadTooLarge(f"{what} has {len(image)} bytes; the limit is {max_bytes}")
    try:
        return decode_image(image, max_pixels, max_decoded_bytes)
    except (InvalidImage, PayloadTooLarge) as exc:
        if what == "image":
            raise
        raise type(exc)(f"{what}: {exc.message}") from exc


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int,
                 max_decoded_bytes: int | None = None) -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB.

    Raises:
        InvalidImage: empty, not an image, unsupported format, truncated, too small.
        PayloadTooLarge: more than ``max_pixels`` pixels or ``max_decoded_bytes`` decoded bytes
            (checked from the header, before decoding).
    """
    raw = bytes(data)
    if not raw:
        raise InvalidImage("image is empty (0 bytes)")
    _check_header(probe(raw), max_pixels, max_decoded_bytes)
    try:
        with warnings.catch_warnings():
            # the pixel limit below replaces Pillow's bomb warning; its other warnings (corrupt EXIF,
            # truncated tags) would only print to stderr, or escape as exceptions under -W error
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
                )
            fast = _decode_png(raw) if img.format == "PNG" else None
            if fast is not None:
                return _check_size(fast)
            img.load()
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            f"not a supported image ({', '.join(SUPPORTED_FORMATS)} accepted)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image exceeds the pixel limit: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"image cannot be decoded (truncated or corrupt): {exc}") from exc
    return _to_rgb(img)


def _decode_png(raw: bytes) -> np.ndarray | None:
    """PNG through imagecodecs' libpng 1.6 (GIL released while it decodes).

    A 900 x 900 RGB ROI of the bottle set decodes in ~14 ms here, against ~22-25 ms through
    OpenCV's libpng and ~37 ms through Pillow, with the same pixels. None when it cannot decode
    the file (truncated, corrupt): Pillow then decodes it or reports the precise error. Only
    PNG: libpng fails on truncation, while a JPEG decoder may silently grey-fill a truncated file.
    """
    try:
        arr = png_decode(raw)
    except (RuntimeError, ValueError):          # imagecodecs.PngError is a RuntimeError
        return None
    if arr.dtype not in (np.uint8, np.uint16):
        return None
    if arr.dtype == np.uint16:
        arr = _to_8_bits(arr)
    if arr.ndim == 3 and arr.shape[2] == 2:     # grey + alpha
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        return None
    return np.ascontiguousarray(arr[:, :, :3])


def _to_8_bits(values: np.ndarray) -> np.ndarray:
    """uint16 -> uint8, rounded to the nearest level (65535 -> 255)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
    elif mode == "RGB":
        rgb = np.asarray(img, dtype=np.uint8)
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)  # L, LA, P, RGBA, CMYK, YCbCr, 1
    return _check_size(np.ascontiguousarray(rgb))


def from_array(array: np.ndarray, max_pixels: int) -> np.ndarray:
    """A pixel buffer (H, W), (H, W, 1|3|4) of uint8 or uint16 (RGB order) -> (H, W, 3) uint8.

    Raises:
        InvalidImage: wrong dtype or shape, too small.
        PayloadTooLarge: more than ``max_pixels`` pixels.
    """
    if not isinstance(array, np.ndarray):
        raise InvalidImage("image must be bytes or a numpy array")
    if array.dtype not in (np.uint8, np.uint16):
        raise InvalidImage(f"pixel buffer dtype must be uint8 or uint16, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InvalidImage(f"pixel buffer shape must be (H, W) or (H, W, 1|3|4), got {array.shape}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise PayloadTooLarge(f"image of {array.shape[1]}x{array.shape[0]} pixels exceeds {max_pixels}")
    if array.dtype == np.uint16:
        array = _to_8_bits(array)
    array = array.astype(np.uint8, copy=False)
    channels = array.shape[2]
    if channels == 1:
        array = np.repeat(array, 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    return _check_size(np.ascontiguousarray(array))


def _check_size(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise InvalidImage(f"image of {width}x{height} is too small (each side must be >= {MIN_SIDE} px)")
    return rgb


def resize_square(rgb: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) -> (side, side, 3): area averaging when shrinking, bilinear when enlarging."""
    height, width = rgb.shape[:2]
    if height == side and width == side:
        return rgb
    shrinking = height * width >= side * side
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(rgb, (side, side), interpolation=interpolation)
