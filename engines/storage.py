"""Reading and writing model files on local disk or any Beam filesystem (gs://, ...).

Beam's ``FileSystems`` is used only as a portable file API (it is imported lazily);
nothing here knows about pipelines.
"""

from __future__ import annotations

import os
import uuid

from engines.base import EngineError


def _is_local(path: str) -> bool:
    return "://" not in path


def exists(path: str) -> bool:
    """True when ``path`` names an existing file."""
    if _is_local(path):
        return os.path.isfile(path)
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def read_bytes(path: str) -> bytes:
    """Reads a whole file.

    Raises:
        EngineError: the file does not exist or cannot be read.
    """
    if _is_local(path):
        if not os.path.isfile(path):
            raise EngineError(f"Model file not found: {path}. Prepare the default model with "
                              f"`make model`, or pass the path of an existing file.")
        with open(path, "rb") as f:
            return f.read()
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    except Exception as e:  # Beam filesystems raise several types (IOError, BeamIOError, ...)
        raise EngineError(f"Cannot read model file {path}: {e}") from e


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file, atomically on local disk (temp file + rename).

    Raises:
        EngineError: the file cannot be written.
    """
    try:
        if _is_local(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # unique per call: threads and processes may race
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
    except Exception as e:  # OSError locally; Beam filesystems raise their own types
        raise EngineError(f"Cannot write {path}: {e}") from e


def join(base: str, *parts: str) -> str:
    """Joins path parts for local paths and URLs alike."""
    if _is_local(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])
