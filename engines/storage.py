"""Files on local disk or any Beam filesystem (gs://, ...): the project's one file API.

Every module that touches a path asks this one whether it is a URL (:func:`is_url`), joins
path parts with :func:`join` and reads a whole file with :func:`read`, so local paths and URLs
are told apart, joined and read the same way everywhere. Beam's ``FileSystems`` is used only
as a portable file API (it is imported lazily); nothing here knows about pipelines.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from typing import Dict, List, Optional, Sequence

from engines.base import EngineError


def is_url(path: str) -> bool:
    """True for ``scheme://...`` paths (gs://, s3://, file://, ...), False for local paths.

    The one test of local against URL: a local path is opened with ``open``, a URL through
    Beam's ``FileSystems``.
    """
    return "://" in path


def _on_gcs(path: str) -> bool:
    # GCS alone gives literal prefix listings and generation-matched writes (list_tree, replace_if).
    return path.startswith("gs://")


def read(path: str, size_hint: Optional[int] = None) -> bytes:
    """A whole file's bytes: :func:`read_local` for a local path, Beam's ``FileSystems`` (uncompressed) for a URL.

    Args:
        path: Local path or URL.
        size_hint: A local file's size as a ``stat`` the caller made found it, or None (see :func:`read_local`).

    Raises:
        OSError: a local file that is missing or cannot be read, as ``open`` raises it.
        Exception: for URLs, whatever Beam's filesystem raises (``IOError``, ``BeamIOError``, ...).
            Callers word the message for the file's purpose (:func:`read_bytes` for model files).
    """
    if not is_url(path):
        return read_local(path, size_hint)
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


#: Files larger than this are read as Python reads them (into one buffer): Linux returns at most ~2 GiB from
#: one read(), and a file read in parts and joined would hold two copies at once. Their few system calls more
#: do not matter beside the read itself.
ONE_READ_MAX_BYTES = 1 << 30


def read_local(path: str, size_hint: Optional[int] = None) -> bytes:
    """A local file's bytes in four system calls (open, read, read to its end, close) where Python's
    ``open(path, "rb").read()`` makes nine.

    Each call lets go of the GIL and must win it back; beside threads running Python that costs up to the
    interpreter's switch interval per call, not the call's microseconds (``benchmarks.read_syscalls``). The
    whole file is read whatever ``size_hint`` says: a file that grew since the caller's ``stat`` is read to
    its end, one that shrank comes back short.

    Args:
        path: A local path.
        size_hint: The file's size from the caller's ``stat``; None = ``fstat`` it here.

    Raises:
        OSError: as ``open`` and ``read`` raise it (``FileNotFoundError``, ``IsADirectoryError``, ...), naming
            the file.
    """
    # Not inheritable (PEP 446), and binary where the platform has text mode, as open() makes it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        size = os.fstat(fd).st_size if size_hint is None else size_hint
        if size > ONE_READ_MAX_BYTES:
            with open(fd, "rb", closefd=False) as f:
                return f.read()
        first = os.read(fd, size + 1)  # one more than the size: a file read whole comes back short
        if not first:
            return first
        parts = [first]
        while True:  # the file is longer than its size said: it grew since
            more = os.read(fd, 1 << 20)
            if not more:
                break
            parts.append(more)
        return first if len(parts) == 1 else b"".join(parts)
    except OSError as e:
        if e.filename is None:  # os.read names no file (a directory opens, and fails to read)
            e.filename = path
        raise
    finally:
        os.close(fd)


def exists(path: str) -> bool:
    """True when ``path`` names an existing file."""
    if not is_url(path):
        return os.path.isfile(path)
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path)


def read_bytes(path: str, what: str = "Model file") -> bytes:
    """:func:`read` with checks and messages that name the file's purpose.

    Args:
        path: Local path or URL.
        what: The file's purpose for messages, best naming its flag ("--labels_file"). Default
            "Model file".

    Raises:
        EngineError: the file does not exist, is not a regular file, or cannot be read.
    """
    if not is_url(path):
        if os.path.isdir(path):
            raise EngineError(f"{what} {path} is a directory; pass the path of the file itself")
        if not os.path.exists(path):
            fix = ("Prepare the default model with `make model`, or pass" if "model" in what.lower() else "Pass")
            raise EngineError(f"{what} not found: {path}. {fix} the path of an existing file.")
        if not os.path.isfile(path):
            raise EngineError(f"{what} {path} is not a regular file (a FIFO, device or socket); pass a file")
        try:
            return read(path)
        except MemoryError:
            raise EngineError(f"{what} {path} is {os.path.getsize(path) / 2**30:.1f} GiB, more than this machine can "
                              f"hold in memory; check that it names the right file") from None
        except OSError as e:
            raise EngineError(f"Cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return read(path)
    except MemoryError:
        raise EngineError(f"{what} {path} is more than this machine can hold in memory; check that it names the "
                          f"right file") from None
    except Exception as e:  # Beam filesystems raise several types (IOError, BeamIOError, ...)
        raise EngineError(f"Cannot read {what} {path}: {e}") from e


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file, atomically on local disk (temp file + rename).

    A failed local write removes its temp file: on a full disk it would hold space and sit beside
    the outputs as ``*.tmp-*`` debris.

    Raises:
        EngineError: the file cannot be written; a full disk or a size or quota limit is named as such.
    """
    tmp = None
    try:
        if not is_url(path):
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
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        fix = "; free space on that disk (or raise its quota or file-size limit) and rerun" if full else ""
        raise EngineError(f"Cannot write {path}: {e}{fix}") from e


def join(base: str, *parts: str) -> str:
    """Joins path parts for local paths and URLs alike.

    Local paths join as :func:`os.path.join` joins them. For a URL each part is appended with one
    ``/`` between them (a part's leading slash does not restart at the root); the last part keeps a
    trailing slash, as :func:`os.path.join` keeps it.
    """
    if not is_url(base):
        return os.path.join(base, *parts)
    inner = [p.strip("/") for p in parts[:-1]] + [p.lstrip("/") for p in parts[-1:]]
    return "/".join([base.rstrip("/")] + inner)


def canonical(path: str) -> str:
    """One spelling per location, for comparing paths and URIs.

    Local paths become absolute with symbolic links, ``.``, ``..`` and repeated slashes resolved
    (``./scored//dt=1`` and a symlinked root name the same folder); URLs get a lower-case scheme
    and no trailing slash. ``gs://b/a//b`` stays as it is: object names may hold ``//``.
    """
    if not is_url(path):
        return os.path.realpath(os.path.abspath(path))
    scheme, rest = path.split("://", 1)
    return f"{scheme.lower()}://{rest.rstrip('/')}"


def canonical_files(paths: Sequence[str], links: Optional[Sequence[Optional[bool]]] = None) -> List[str]:
    """:func:`canonical` of each path, for many files at once: a local file's folder is resolved once per
    call, not once per file.

    ``os.path.realpath`` stats every component of every path in Python; for the refs of a batch (256 files of
    one folder) that was 10% of a bundle thread's time with four threads on a 16-core GPU host (py-spy,
    benchmarks/NOTES.md). A file that is itself a symbolic link is resolved whole, as :func:`canonical` does.

    Args:
        paths: Files, local or URLs.
        links: Per path, whether its absolute spelling (``os.path.abspath``) is a symbolic link, where the
            caller already knows it from an ``lstat``; None (for all, or for one path): checked here.

    Raises:
        OSError, ValueError: as :func:`canonical` (a NUL byte, an over-long name).
    """
    folders: Dict[str, str] = {}
    out = []
    for i, path in enumerate(paths):
        if is_url(path):
            out.append(canonical(path))
            continue
        if "\0" in path:
            raise ValueError(f"embedded null byte in {path!r}")  # as os.path.realpath says
        full = os.path.abspath(path)
        folder, name = os.path.split(full)
        link = links[i] if links is not None else None
        if not name or (os.path.islink(full) if link is None else link):
            out.append(os.path.realpath(full))
            continue
        resolved = folders.get(folder)
        if resolved is None:
            resolved = folders[folder] = os.path.realpath(folder)
        out.append(os.path.join(resolved, name))
    return out


def _escape_glob(path: str) -> str:
    # Beam's glob has no escape character, but a one-character class matches that character.
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def list_tree(directory: str) -> list:
    """Every file under ``directory`` (recursively), its name taken literally: ``*``, ``?`` and
    ``[`` in it are characters, not a glob. Empty when the folder does not exist."""
    if not is_url(directory):
        found = []
        for root, dirs, files in os.walk(directory):
            found += [os.path.join(root, name) for name in files]
            found += [os.path.join(root, name) for name in dirs if os.path.islink(os.path.join(root, name))]
        return found
    prefix = directory.rstrip("/") + "/"
    if _on_gcs(directory):
        from apache_beam.io.gcp.gcsio import GcsIO

        return [name for name, _ in GcsIO().list_files(prefix)]  # a literal prefix listing
    from apache_beam.io.filesystems import FileSystems

    try:
        return [m.path for m in FileSystems.match([_escape_glob(prefix) + "**"])[0].metadata_list]
    except Exception:  # Beam raises BeamIOError for a folder that does not exist
        return []


def list_children(directory: str) -> list:
    """Names directly in ``directory`` (files and folders, a folder once), taken literally."""
    if not is_url(directory):
        try:
            return sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
    prefix = directory.rstrip("/") + "/"
    return sorted({path[len(prefix):].split("/", 1)[0] for path in list_tree(directory) if path.startswith(prefix)})


def delete_tree(path: str) -> None:
    """Deletes a file, or a folder and everything in it; nothing when it is missing (literal name)."""
    if not is_url(path):
        import shutil

        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=False, onerror=None)
        elif os.path.lexists(path):
            os.remove(path)
        return
    from apache_beam.io.filesystems import FileSystems

    files = list_tree(path)
    if exists(path):
        files.append(path)
    if files:
        FileSystems.delete(files)


#: The version token of a file that does not exist (see :func:`version_token`).
ABSENT = "absent"


class VersionMismatch(Exception):
    """:func:`replace_if` found another version than the expected one; nothing was written.

    Attributes:
        path: The file.
        current: Its content now (None when it does not exist).
    """

    def __init__(self, path: str, current):
        super().__init__(f"{path} changed since its version was read")
        self.path, self.current = path, current


def _local_token(data) -> str:
    import hashlib

    return ABSENT if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


def _gcs_blob(path: str):
    from apache_beam.io.gcp.gcsio import GcsIO, parse_gcs_path

    bucket, name = parse_gcs_path(path)
    return GcsIO().client.bucket(bucket), name


def read_versioned(path: str):
    """``(token, content)`` of a small file: content None and token :data:`ABSENT` when missing.

    The token names this exact version: on GCS the object's generation (``gen:N``), elsewhere a
    SHA-256 of the content. :func:`replace_if` writes only over the version it names.
    """
    if _on_gcs(path):
        from google.api_core import exceptions

        bucket, name = _gcs_blob(path)
        for _ in range(5):  # a new generation between the two requests: read again
            blob = bucket.get_blob(name)
            if blob is None:
                return ABSENT, None
            try:
                return f"gen:{blob.generation}", blob.download_as_bytes(if_generation_match=blob.generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                continue
        raise EngineError(f"{path} changed five times while being read; is something rewriting it in a loop?")
    if not is_url(path):
        try:
            data = read(path)
        except FileNotFoundError:
            data = None
    else:
        data = read_bytes(path, "file") if exists(path) else None
    return _local_token(data), data


def version_token(path: str) -> str:
    """The version token of ``path`` now (:func:`read_versioned`)."""
    return read_versioned(path)[0]


def replace_if(path: str, data: bytes, expected: str, lock_timeout_s: float = 300.0) -> None:
    """Writes ``data`` to ``path`` only if ``path`` is still at version ``expected``: a compare-and-swap.

    Readers see the old content or the new one, whole, never a mix:
    - local disk: under an exclusive ``flock`` on the file's folder (writers on one machine;
      ``flock`` does not reach across NFS clients), the version is checked, the data
      written to a temporary file, flushed to disk, and renamed over ``path`` (atomic on POSIX);
      the folder is flushed too, so the rename survives a power loss.
    - gs://: one upload with ``ifGenerationMatch`` (0 when ``expected`` is :data:`ABSENT`): GCS
      refuses it with 412 when another writer got there first (docs/scheduling.md cites the docs).
    - other filesystems: checked, then written: two writers within that gap can both succeed.

    Raises:
        VersionMismatch: the file is at another version (nothing was written).
        EngineError: the lock was not free within ``lock_timeout_s``.
    """
    if _on_gcs(path):
        from google.api_core import exceptions

        bucket, name = _gcs_blob(path)
        generation = 0 if expected == ABSENT else int(expected.split(":", 1)[1]) if expected.startswith("gen:") else -1
        if generation < 0:
            raise VersionMismatch(path, read_versioned(path)[1])
        try:
            bucket.blob(name).upload_from_string(data, content_type="application/json",
                                                 if_generation_match=generation)
        except exceptions.PreconditionFailed:
            raise VersionMismatch(path, read_versioned(path)[1]) from None
        return
    if is_url(path):
        token, current = read_versioned(path)
        if token != expected:
            raise VersionMismatch(path, current)
        write_bytes(path, data)
        return
    import contextlib
    import fcntl
    import time

    folder = os.path.dirname(os.path.abspath(path))
    lock = os.open(folder, os.O_RDONLY)  # the folder itself is the lock: nothing is left behind
    try:
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineError(f"waited {lock_timeout_s:.0f} s for another process to finish writing {path} "
                                      f"(it holds a lock on {folder}); is another run committing this folder?") from None
                time.sleep(0.05)
        token, current = read_versioned(path)
        if token != expected:
            raise VersionMismatch(path, current)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        fsync_folder(folder)
    finally:
        os.close(lock)  # releases the flock


def fsync_folder(folder: str) -> None:
    """Flushes a local folder's entries (new names, renames) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flushes a local file's data to disk (nothing for URLs: an object is durable once written)."""
    if is_url(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
