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


def read_bytes(path: str, what: str = "Model file") -> bytes:
    """Reads a whole file.

    Args:
        path: Local path or URL.
        what: The file's purpose for messages, best naming its flag ("--labels_file"). Default
            "Model file".

    Raises:
        EngineError: the file does not exist, is not a regular file, or cannot be read.
    """
    if _is_local(path):
        if os.path.isdir(path):
            raise EngineError(f"{what} {path} is a directory; pass the path of the file itself")
        if not os.path.exists(path):
            fix = ("Prepare the default model with `make model`, or pass" if "model" in what.lower() else "Pass")
            raise EngineError(f"{what} not found: {path}. {fix} the path of an existing file.")
        if not os.path.isfile(path):
            raise EngineError(f"{what} {path} is not a regular file (a FIFO, device or socket); pass a file")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise EngineError(f"Cannot read {what} {path}: {e.strerror or e}") from None
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    except Exception as e:  # Beam filesystems raise several types (IOError, BeamIOError, ...)
        raise EngineError(f"Cannot read {what} {path}: {e}") from e


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
