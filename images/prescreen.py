"""A cheap header-only check that routes each image to the GPU decoder or to Pillow.

NVIDIA DALI's GPU decoder differs from the CPU path (``images.pillow_decoder``) in ways that
matter (measured on the demo images): it drops alpha instead of compositing on white,
fails on palette GIFs, SVG, empty files and text with an error that breaks the whole DALI
pipeline, and *decodes a decompression bomb and a truncated JPEG without any error*. So only
images whose headers prove them sound and of a kind DALI decodes like Pillow go to the GPU:

- JPEG: baseline, extended or progressive Huffman (SOF0/1/2), 1 or 3 components, an EXIF
  orientation of 1-8 if any, ending with the EOI marker (not truncated);
- PNG: 8- or 16-bit grey or RGB, not interlaced, no transparency chunk, not animated, no EXIF
  chunk, ending with IEND;
- and at most ``max_pixels`` pixels.

Everything else - alpha, palette, CMYK, animation, other formats, and anything broken - takes
the Pillow path, which gives broken files exactly the dead-letter reasons of ``--decode cpu``.
Pure Python on the first few hundred bytes (and the last 12): no decoding, no Beam.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

GPU = "gpu"
CPU = "cpu"

_JPEG_SOF_GPU = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
_JPEG_SOF_ALL = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class Screen(NamedTuple):
    """Where an image goes and why.

    Attributes:
        route: ``"gpu"`` (DALI decodes it like Pillow would) or ``"cpu"`` (Pillow).
        format: ``"jpeg"``, ``"png"`` or ``"other"``.
        width, height: Header dimensions (0 when unknown).
        why: For ``"cpu"``, the reason it did not qualify for the GPU (logs, tests).
    """

    route: str
    format: str
    width: int = 0
    height: int = 0
    why: str = ""


def _cpu(fmt: str, why: str, width: int = 0, height: int = 0) -> Screen:
    return Screen(CPU, fmt, width, height, why)


def _u16(data: bytes, i: int, little: bool = False) -> int:
    return int.from_bytes(data[i:i + 2], "little" if little else "big")


def _u32(data: bytes, i: int, little: bool = False) -> int:
    return int.from_bytes(data[i:i + 4], "little" if little else "big")


def exif_orientation(segment: bytes) -> Optional[int]:
    """The orientation tag (0x0112) of an APP1 ``Exif\\0\\0`` payload, or None if absent or unreadable."""
    tiff = segment[6:]
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    little = tiff[:2] == b"II"
    ifd = _u32(tiff, 4, little)
    if ifd + 2 > len(tiff):
        return None
    for k in range(_u16(tiff, ifd, little)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            return None
        if _u16(tiff, entry, little) == 0x0112:
            return _u16(tiff, entry + 8, little)
    return None


def _screen_jpeg(data: bytes, max_pixels: int) -> Screen:
    i, n = 2, len(data)
    sof = width = height = components = None
    orientation = 1
    while i + 4 <= n:
        if data[i] != 0xFF:
            return _cpu("jpeg", "marker structure broken before the image data")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = _u16(data, i + 2)
        if length < 2:
            return _cpu("jpeg", "bad segment length")
        if marker in _JPEG_SOF_ALL and i + 10 <= n:
            sof, height, width, components = marker, _u16(data, i + 5), _u16(data, i + 7), data[i + 9]
        elif marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            found = exif_orientation(data[i + 4:i + 2 + length])
            orientation = 1 if found is None else found
        elif marker == 0xDA:  # start of scan: the header is over
            break
        i += 2 + length
    else:
        return _cpu("jpeg", "no image data (truncated header)")
    if sof is None:
        return _cpu("jpeg", "no frame header")
    width, height = int(width), int(height)
    if sof not in _JPEG_SOF_GPU:
        return _cpu("jpeg", f"JPEG coding process SOF{sof - 0xC0} (arithmetic, lossless or hierarchical)",
                    width, height)
    if components not in (1, 3):
        return _cpu("jpeg", f"{components} colour components (CMYK/YCCK)", width, height)
    if not 1 <= orientation <= 8:
        return _cpu("jpeg", f"EXIF orientation {orientation}", width, height)
    if width == 0 or height == 0 or width * height > max_pixels:
        return _cpu("jpeg", "no pixels, or over the pixel limit", width, height)
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return _cpu("jpeg", "no end-of-image marker (truncated?)", width, height)
    if orientation >= 5:  # transposed: the decoder's output is height x width
        width, height = height, width
    return Screen(GPU, "jpeg", width, height)


def _screen_png(data: bytes, max_pixels: int) -> Screen:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return _cpu("png", "no IHDR chunk")
    width, height = _u32(data, 16), _u32(data, 20)
    depth, colour, interlace = data[24], data[25], data[28]
    if colour not in (0, 2) or depth not in (8, 16):
        return _cpu("png", f"colour type {colour}, bit depth {depth} (palette, alpha or low bit depth)",
                    width, height)
    if interlace:
        return _cpu("png", "interlaced", width, height)
    if width == 0 or height == 0 or width * height > max_pixels:
        return _cpu("png", "no pixels, or over the pixel limit", width, height)
    i = 8
    while i + 8 <= len(data):
        kind = data[i + 4:i + 8]
        if kind in (b"tRNS", b"acTL", b"eXIf"):
            return _cpu("png", f"{kind.decode()} chunk (transparency, animation or an orientation)", width, height)
        if kind == b"IDAT":
            break
        i += 12 + _u32(data, i)
    if not data.endswith(_PNG_IEND):
        return _cpu("png", "no IEND chunk at the end (truncated?)", width, height)
    return Screen(GPU, "png", width, height)


def screen(data: bytes, max_pixels: int) -> Screen:
    """Routes one encoded image: ``"gpu"`` only when its header proves it sound and DALI-safe.

    Args:
        data: The whole encoded file.
        max_pixels: The pixel limit in force (``--max_pixels``).

    Returns:
        A :class:`Screen`. Never raises: anything unreadable is routed to ``"cpu"``, where
        Pillow gives the reason.
    """
    try:
        if data[:3] == b"\xff\xd8\xff":
            return _screen_jpeg(data, max_pixels)
        if data[:8] == _PNG_SIGNATURE:
            return _screen_png(data, max_pixels)
    except (IndexError, ValueError) as e:  # a header cut short mid-field
        return _cpu("other", f"unreadable header ({e})")
    return _cpu("other", "not JPEG or PNG")
