"""Read and decode one image, in any thread or process: ``uri -> Decoded``.

Kept free of Beam at import time (Beam's filesystems are imported only for URLs such as
``gs://``) so decode worker processes start fast. Never raises for a bad file: the
reason is returned for the dead-letter output.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import numpy as np

from transforms.prescreen import GPU, screen
from transforms.preprocess import BadImageError, PreprocessConfig, preprocess_image


class Decoded(NamedTuple):
    """The outcome for one image: an array, encoded bytes for the GPU decoder, or an error
    with the stage that failed."""

    array: Optional[np.ndarray]
    error: Optional[str]
    stage: str  # "read" or "decode"
    read_s: float
    decode_s: float
    nbytes: int
    encoded: Optional[bytes] = None  # set instead of `array` when the image goes to the GPU decoder


def read_file(uri: str) -> bytes:
    """Reads a whole file: plain ``open`` for local paths, Beam's FileSystems for URLs (gs://, ...)."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def load_image(uri: str, config: PreprocessConfig, gpu_decode: bool = False) -> Decoded:
    """Reads and preprocesses one image into a uint8 (crop, crop, 3) array, or says why not.

    With ``gpu_decode``, an image the header pre-screen (:mod:`transforms.prescreen`) finds
    sound and DALI-safe is returned undecoded (``encoded``) for the GPU decoder; every other
    one is decoded here with Pillow, so broken files get the same reasons as on the CPU path.
    """
    start = time.perf_counter()
    try:
        data = read_file(uri)
    except Exception as e:  # OSError locally; Beam filesystems wrap errors in several types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Decoded(None, f"cannot read file ({type(e).__name__}: {reason}); check the path exists and the "
                             f"job's credentials can read it", "read", time.perf_counter() - start, 0.0, 0)
    read_done = time.perf_counter()
    if gpu_decode and screen(data, config.max_pixels).route == GPU:
        return Decoded(None, None, "decode", read_done - start, time.perf_counter() - read_done, len(data), data)
    try:
        array, error = preprocess_image(data, config), None
    except BadImageError as e:
        array, error = None, str(e)
    except Exception as e:  # a decoder bug on a malformed file must not stop the job either
        array, error = None, f"unexpected decoder error on a malformed file ({type(e).__name__}: {e})"
    return Decoded(array, error, "decode", read_done - start, time.perf_counter() - read_done, len(data))
