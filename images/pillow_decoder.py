"""Decode one image with Pillow and resize-and-crop it: bytes -> uint8 RGB (height, width, 3).

The CPU decoder, beside the GPU one (:mod:`images.dali_decoder`). Pure functions, no Beam:
the batch reader (:mod:`images.reading`) calls them, the GPU decoder crops the box
:func:`crop_box` gives, ``python -m model_tools.validate`` feeds engines :func:`resize_and_crop`
pixels, and tests compare them with an independent reference computation.

Steps: refuse empty/non-image/oversized input, JPEG draft mode (DCT-domain
downscaling while the shorter side stays >= ``resize``), EXIF orientation,
mode conversion to RGB (alpha composited on white, 16-bit scaled to 8-bit),
resize the shorter side to ``resize`` and centre-crop ``crop_size`` (height x width, square
unless ``crop_width`` is given; done as one Pillow resize of just the cropped region).
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


class BadImageError(ValueError):
    """An input that cannot become a model input; the message names the problem and the fix."""


def crop_problem(resize: int, crop: int, crop_width: Optional[int] = None) -> Optional[str]:
    """What is wrong with a resize and a (height, optional width) centre crop, or None: the crop must fit
    the resized shorter side of landscape and portrait images alike. Shared by the CPU and GPU decoders'
    options, each raising its own error with it."""
    if crop_width is None:
        if crop <= 0 or resize < crop:
            return f"need 0 < crop <= resize, got crop={crop} resize={resize}"
    elif min(crop, crop_width) <= 0 or resize < max(crop, crop_width):
        return (f"need 0 < crop <= resize and 0 < crop_width <= resize (the centre crop must fit the shorter side "
                f"of landscape and portrait images alike), got crop={crop} crop_width={crop_width} resize={resize}")
    return None


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """How images are turned into model inputs.

    Attributes:
        resize: Length the shorter side is resized to; at least the crop's height and width, so
            the centre crop fits the shorter side of a landscape and of a portrait image. Default 256.
        crop: Height of the centre crop (the model input's rows), and its width too unless
            ``crop_width`` is given. Default 224.
        crop_width: Width of the centre crop (the model input's columns), e.g. 320 with
            ``crop=240`` for a 240 x 320 model. Default None: ``crop``, a square.
        max_pixels: Images with more pixels are refused as possible
            decompression bombs. Default 89,478,485 (Pillow's own limit).
        draft: Let the JPEG decoder downscale by 1/2, 1/4 or 1/8 while the
            shorter side stays >= ``resize`` (much faster on large photos; the
            final resize still filters). Default True.
        resample: Pillow filter: bilinear (default), bicubic, lanczos, nearest.
    """

    resize: int = 256
    crop: int = 224
    max_pixels: int = 89_478_485
    draft: bool = True
    resample: str = "bilinear"
    crop_width: Optional[int] = None

    def __post_init__(self):
        problem = crop_problem(self.resize, self.crop, self.crop_width)
        if problem:
            raise ValueError(problem)
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    @property
    def crop_size(self) -> Tuple[int, int]:
        """The centre crop as (height, width): the shape of every output array but its 3 channels."""
        return self.crop, self.crop if self.crop_width is None else self.crop_width


#: ISO media brands of AVIF, which Pillow decodes (when built with libavif): a file with one of
#: them that Pillow cannot identify is a corrupt AVIF, not an unsupported format.
_AVIF_BRANDS = (b"ftypavif", b"ftypavis")


def _avif_supported() -> bool:
    from PIL import features

    return bool(features.check("avif"))


# Formats people store next to photos that Pillow cannot decode: name them in the reason.
_UNSUPPORTED = [
    (lambda d: d.startswith(b"%PDF"), "PDF document"),
    (lambda d: d[4:12] in _AVIF_BRANDS and not _avif_supported(),
     "AVIF image (this Pillow was built without AVIF support)"),
    (lambda d: b"<svg" in d[:512].lower(), "SVG vector image"),
    (lambda d: d[4:12] in (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypmif1"), "HEIC/HEIF image"),
    (lambda d: d[4:8] == b"ftyp", "video or ISO media file"),
    (lambda d: d.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL ")), "JPEG XL image"),
]


def _describe_start(data: bytes) -> str:
    head = data[:16]
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"starts with text {head.decode('ascii', 'replace')!r}"
    return f"starts with bytes {head.hex(' ')}"


def over_limit_message(size: str, config: PreprocessConfig) -> str:
    """The dead-letter reason for an image over ``--max_pixels``, quoting the limit in force."""
    return (f"image is {size}, over the pixel limit of {config.max_pixels / 1e6:.1f} Mpx (--max_pixels "
            f"{config.max_pixels}; possible decompression bomb); raise --max_pixels only if the file is trusted")


def open_image(data: bytes, config: PreprocessConfig) -> Image.Image:
    """Opens (header only) and checks the size limit.

    Raises:
        BadImageError: empty, not a supported image, or over ``max_pixels``.
    """
    if not data:
        raise BadImageError("empty file (0 bytes): nothing to decode; re-export or re-upload the image")
    if Image.MAX_IMAGE_PIXELS is not None and config.max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow refuses images over twice its own limit before our check can apply a higher
        # --max_pixels; raise its limit to ours (process-wide, only ever upwards) so ours decides.
        Image.MAX_IMAGE_PIXELS = config.max_pixels
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data[4:12] in _AVIF_BRANDS and _avif_supported():
            raise BadImageError(f"truncated or corrupt AVIF data ({len(data)} bytes; the decoder could not read it); "
                                f"re-export or re-download the file") from None
        for matches, name in _UNSUPPORTED:
            if matches(data):
                raise BadImageError(f"unsupported format: {name} ({len(data)} bytes); convert it to JPEG or PNG "
                                    f"to score it") from None
        start = _describe_start(data)
        what = "not an image: the file holds text" if start.startswith("starts with text") else \
            "not a supported image format"
        raise BadImageError(f"{what} ({len(data)} bytes, {start}); expected JPEG, PNG, WebP, GIF, BMP or "
                            f"TIFF") from None
    except Image.DecompressionBombError as e:
        # Pillow's own refusal quotes Pillow's limit; the user set --max_pixels, so quote that.
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels.group(1)) / 1e6:.1f} Mpx" if pixels else "larger than Pillow accepts"
        raise BadImageError(over_limit_message(size, config)) from None
    width, height = image.size
    if width * height > config.max_pixels:
        raise BadImageError(over_limit_message(f"{width}x{height} = {width * height / 1e6:.1f} Mpx", config))
    if width == 0 or height == 0:
        raise BadImageError(f"image has no pixels ({width}x{height})")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    elif mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colours (often black); composite on white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples: keep the top 8 bits (convert("RGB") would clip at 255).
        array = np.asarray(image).astype(np.uint32)
        array = np.clip(array >> 8 if array.max() > 255 else array, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        if array.size and array.max() <= 1.0:
            array = array * 255.0
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: Pillow converts these exactly.
    return image.convert("RGB")


def _draft(image: Image.Image, config: PreprocessConfig) -> None:
    if not config.draft or image.format != "JPEG":
        return
    width, height = image.size
    scale = config.resize / min(width, height)
    if scale >= 0.5:
        return  # no DCT reduction is possible without going under `resize`
    # draft() picks the largest reduction whose result is still >= the requested size.
    requested = (math.ceil(width * scale), math.ceil(height * scale))
    image.draft("RGB" if image.mode == "RGB" else None, requested)


def crop_box(width: int, height: int, config: PreprocessConfig):
    """The source-pixel box that "resize shorter side, centre-crop" keeps.

    Returns:
        (left, top, right, bottom) as floats in source coordinates.
    """
    crop_h, crop_w = config.crop_size
    scale = config.resize / min(width, height)
    resized_w, resized_h = round(width * scale), round(height * scale)
    left = (resized_w - crop_w) // 2
    top = (resized_h - crop_h) // 2
    sx, sy = width / resized_w, height / resized_h
    return (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)


def resize_and_crop(image: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """Resizes the shorter side to ``config.resize`` and centre-crops ``config.crop_size``, in one
    Pillow resize of just the :func:`crop_box` region.

    Args:
        image: An RGB Pillow image.
        config: Sizes and the resampling filter.

    Returns:
        A C-contiguous uint8 array (height, width, 3) of ``config.crop_size``.
    """
    width, height = image.size
    crop_h, crop_w = config.crop_size
    out = image.resize((crop_w, crop_h), _RESAMPLE[config.resample], box=crop_box(width, height, config))
    return np.asarray(out, dtype=np.uint8)


def preprocess_image(data: bytes, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Decodes image bytes into a uint8 RGB array of shape (height, width, 3), ``config.crop_size``.

    Args:
        data: The encoded file.
        config: Sizes and limits. Default ``PreprocessConfig()``.

    Returns:
        A C-contiguous uint8 array (height, width, 3).

    Raises:
        BadImageError: the reason names the problem (empty, not an image,
            truncated or corrupt, over the pixel limit) and the fix.
    """
    image = open_image(data, config)
    try:
        _draft(image, config)
        image = ImageOps.exif_transpose(image)  # loads the pixels
        image = _to_rgb(image)
        return resize_and_crop(image, config)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"),
        # SyntaxError (bad PNG chunks) or ValueError/EOFError from plugins.
        raise BadImageError(f"truncated or corrupt {image.format or 'image'} data ({type(e).__name__}: {e}); "
                            f"re-export or re-download the file") from None
    except Image.DecompressionBombError:
        raise BadImageError(over_limit_message(f"{image.size[0]}x{image.size[1]} once decoded", config)) from None
