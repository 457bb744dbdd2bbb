"""Read one image file by the reading rules, then pre-screen or decode it: ``uri -> Decoded``.

Kept free of Beam at import time (files are read through :mod:`engines.storage`, which imports
Beam's filesystems only for URLs such as ``gs://``). Decoding itself is :mod:`images.pillow_decoder`'s.
Never raises for a bad file: the reason is returned for the dead-letter output.

The reading rules live here as plain functions so every reader (the batch reader
``transforms.images.ReadImageBatches`` today) applies the same ones, and a hostile file is
refused the same way whichever reader meets it:

* :func:`not_a_regular_file` refuses a FIFO, device, socket or directory *before* opening it
  (``open()`` on a FIFO blocks until a writer appears: one such file hung a whole job);
* :func:`read_with_timeout` turns a read that stalls (a slow ``gs://`` object, a stuck network
  mount) into an error after ``timeout_s`` instead of hanging the job;
* :data:`IN_FLIGHT` knows which reads are running and since when, so progress can name the
  files that take long.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import threading
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from engines import storage
from images.pillow_decoder import BadImageError, PreprocessConfig, crop_box, preprocess_image
from images.prescreen import GPU, screen

#: Default for ``--read_timeout_s``: far above any healthy read of one image (a 50 MB object
#: from GCS takes well under 10 s on a worker), short enough that a stuck file costs a minute.
DEFAULT_READ_TIMEOUT_S = 60.0


#: Most bytes per pixel an image file the decoders take can need: 16-bit RGBA stored uncompressed is 8;
#: twice that leaves room for metadata, thumbnails and the pages of a multi-page TIFF before the one
#: decoded. A larger file cannot hold an image under --max_pixels, and reading it whole could take
#: all of a worker's memory (a 30 GiB file ended as MemoryError, or the worker killed).
MAX_FILE_BYTES_PER_PIXEL = 16
#: Headers and embedded metadata (ICC profiles, XMP, previews) a small image may carry on top.
FILE_SIZE_ALLOWANCE = 64 << 20


def max_file_bytes(max_pixels: int) -> int:
    """The largest file read as an image under ``max_pixels`` (see :data:`MAX_FILE_BYTES_PER_PIXEL`)."""
    return max_pixels * MAX_FILE_BYTES_PER_PIXEL + FILE_SIZE_ALLOWANCE


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def too_large_reason(size: int, max_pixels: int) -> str:
    """The dead-letter reason for a file too large to be an image under ``--max_pixels``."""
    return (f"file is {_gib(size)}, more than an image under the pixel limit can take "
            f"({_gib(max_file_bytes(max_pixels))} for --max_pixels {max_pixels}), so it is not read; remove it "
            f"from the input, or raise --max_pixels if it is a real image")


def _size_of(uri: str) -> Optional[int]:
    """The size of a file in bytes, or None where it cannot be read."""
    try:
        if not storage.is_url(uri):
            return os.path.getsize(uri)
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.match([uri], limits=[1])[0].metadata_list[0].size_in_bytes
    except Exception:  # the read that follows reports a missing or unreadable file
        return None


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
    box: Optional[Tuple[float, float, float, float]] = None  # its crop region (crop_box), with `encoded`


class ReadTimeout(OSError):
    """A read that did not finish within its time limit."""


_KINDS = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def describe_stat_error(path: str, error: OSError) -> str:
    """What an ``os.stat`` failure on a local input means, with the fix."""
    if error.errno == errno.ELOOP:
        return "symlink loop (the link resolves back to itself); point the link at a real file or remove it"
    if error.errno == errno.ENOENT and os.path.islink(path):
        return (f"broken symlink (its target is missing: {os.readlink(path)}); restore the target or remove "
                f"the link")
    if error.errno == errno.ENOENT:
        return "file not found; check the path exists"
    if error.errno == errno.EACCES:
        return "permission denied; give the job's user read access to the file and its folders"
    return f"cannot stat the file ({error.strerror or error}); check the file and the job's permissions"


def not_a_regular_file(path: str) -> Optional[str]:
    """Why a local input cannot be read as an image file, or None when it is a regular file.

    Only ``os.stat`` runs (following symlinks); nothing is opened, so a FIFO or a device
    cannot block the caller. URLs (``gs://...``) are not checked here (None).
    """
    return regular_file_size(path)[0]


def regular_file_size(path: str) -> Tuple[Optional[str], Optional[int]]:
    """``(None, size in bytes)`` for a local regular file, ``(why it cannot be read as an image file, None)``
    for anything else, ``(None, None)`` for a URL: :func:`not_a_regular_file` and the size from one ``os.stat``."""
    if storage.is_url(path):
        return None, None
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot read file ({describe_stat_error(path, e)})", None
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None, st.st_size
    what = next((name for test, name in _KINDS if test(mode)), "not a file")
    fix = ("list the image files, or pass the directory itself as --input to score it recursively"
           if stat.S_ISDIR(mode) else "only regular files are read; remove it from the input or list real files")
    return f"not a regular file: {path} is {what}; {fix}", None


class InFlightReads:
    """The reads running now, with their start times, so progress can name slow files.

    Process-local and thread-safe; readers wrap each read in :meth:`track`.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._reads: Dict[int, Tuple[str, float]] = {}

    @contextlib.contextmanager
    def track(self, uri: str) -> Iterator[None]:
        key = next(self._ids)
        with self._lock:
            self._reads[key] = (uri, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._reads.pop(key, None)

    def older_than(self, seconds: float) -> List[Tuple[str, float]]:
        """``[(uri, seconds running)]`` for reads running longer than ``seconds``, longest first."""
        now = time.monotonic()
        with self._lock:
            slow = [(uri, now - start) for uri, start in self._reads.values() if now - start > seconds]
        return sorted(slow, key=lambda item: -item[1])


#: The reads of this process (every thread of every DoFn instance).
IN_FLIGHT = InFlightReads()


def read_timeout_reason(timeout_s: float) -> str:
    """The dead-letter reason for a read that stalled."""
    return (f"read did not finish within {timeout_s:g} s (a stalled read: a slow object store or a stuck mount); "
            f"raise --read_timeout_s if the file is just slow")


def read_with_timeout(uri: str, timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S,
                      in_flight: Optional[InFlightReads] = IN_FLIGHT, size_hint: Optional[int] = None) -> bytes:
    """:func:`engines.storage.read` with a time limit.

    The read runs in a daemon thread. Python cannot interrupt a thread blocked in a system call,
    so a read that stalls for good leaves its thread behind (parked on the stuck file, holding
    no lock) and the caller gets :class:`ReadTimeout`; the job goes on.

    Args:
        uri: Local path or URL.
        timeout_s: Seconds before giving up; None or 0 reads inline without a limit.
            Default :data:`DEFAULT_READ_TIMEOUT_S`.
        in_flight: Registry the read is listed in while it runs, or None. Default :data:`IN_FLIGHT`.
        size_hint: A local file's size from the caller's ``stat``, or None (:func:`engines.storage.read`).

    Raises:
        ReadTimeout: the read took longer than ``timeout_s``.
        Exception: whatever :func:`engines.storage.read` raises.
    """
    tracking = in_flight.track(uri) if in_flight is not None else contextlib.nullcontext()
    with tracking:
        if not timeout_s:
            return storage.read(uri, size_hint)
        box: Dict[str, object] = {}
        done = threading.Event()

        def target():
            try:
                box["data"] = storage.read(uri, size_hint)
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name=f"read {uri[-40:]}", daemon=True).start()
        if not done.wait(timeout_s):
            raise ReadTimeout(read_timeout_reason(timeout_s))
        if "error" in box:
            raise box["error"]
        return box["data"]


def readable_size(uri: str, config: PreprocessConfig,
                  known: Optional[int] = None) -> Tuple[Optional[str], Optional[int]]:
    """``(why the file is not read, None)``, or ``(None, its size)`` (None for a URL): :func:`regular_file_size`
    unless the caller's own ``stat`` of a regular file found its size (``known``), then the size limit
    (:func:`max_file_bytes`) on whichever size there is."""
    refused, size = (None, known) if known is not None else regular_file_size(uri)
    if size is not None and size > max_file_bytes(config.max_pixels):
        return too_large_reason(size, config.max_pixels), None
    return refused, size


def load_image(uri: str, config: PreprocessConfig, gpu_decode: bool = False,
               read_timeout_s: Optional[float] = DEFAULT_READ_TIMEOUT_S) -> Decoded:
    """Reads and preprocesses one image into a uint8 (height, width, 3) array (``config.crop_size``),
    or says why not.

    With ``gpu_decode``, an image the header pre-screen (:mod:`images.prescreen`) finds
    sound and DALI-safe is returned undecoded (``encoded``) for the GPU decoder; every other
    one is decoded here with Pillow, so broken files get the same reasons as on the CPU path.

    Args:
        uri: Local path or URL.
        config: Preprocessing sizes and limits.
        gpu_decode: See above. Default False.
        read_timeout_s: See :func:`read_with_timeout`; None reads inline (the batched reader
            watches whole chunks instead, see ``transforms.images``). Default
            :data:`DEFAULT_READ_TIMEOUT_S`.
    """
    start = time.perf_counter()
    refused, size = readable_size(uri, config)
    if refused is not None:
        return Decoded(None, refused, "read", time.perf_counter() - start, 0.0, 0)
    try:
        data = read_with_timeout(uri, read_timeout_s, size_hint=size)
    except ReadTimeout as e:
        return Decoded(None, f"cannot read file ({e})", "read", time.perf_counter() - start, 0.0, 0)
    except MemoryError:
        # Not "check the path and credentials": the file is there, this worker cannot hold it.
        size = _size_of(uri)
        unread = ("" if storage.is_url(uri) else f" (local files over {_gib(max_file_bytes(config.max_pixels))} are "
                                                 f"refused unread: lower --max_pixels {config.max_pixels} to refuse "
                                                 f"this one)")
        return Decoded(None, f"cannot read file: it is {_gib(size) if size is not None else 'larger'}, more than this "
                             f"worker can hold in memory; remove it from the input or run on workers with more "
                             f"memory{unread}", "read", time.perf_counter() - start, 0.0, 0)
    except Exception as e:  # OSError locally; Beam filesystems wrap errors in several types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Decoded(None, f"cannot read file ({type(e).__name__}: {reason}); check the path exists and the "
                             f"job's credentials can read it", "read", time.perf_counter() - start, 0.0, 0)
    return screen_or_decode(data, config, gpu_decode, time.perf_counter() - start)


#: Files larger than this are read one at a time by Python even when a batch is read together
#: (:func:`load_local_batch`): DALI keeps its output buffers at the largest size a pipeline has produced, so
#: a few large files would pin that much memory per reader thread for the rest of the job.
TOGETHER_MAX_FILE_BYTES = 4 << 20
#: Most bytes one DALI read of files together holds (:func:`load_local_batch`), for the same reason.
TOGETHER_MAX_BYTES = 64 << 20


def _read_groups(sizes: Sequence[Tuple[int, int]], max_files: int) -> List[List[int]]:
    """The indexes of ``(index, size)`` grouped in order into reads of at most ``max_files`` files and
    :data:`TOGETHER_MAX_BYTES` bytes (a single larger file is a group of its own)."""
    groups: List[List[int]] = []
    held = 0
    for index, size in sizes:
        if not groups or len(groups[-1]) >= max_files or held + size > TOGETHER_MAX_BYTES:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += size
    return groups


def _reason_line(error: Exception, paths: Sequence[str]) -> str:
    """The line of a failed read's message that names one of ``paths`` (DALI's first line never does)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if any(path in line for path in paths)]
    return (named or lines[-1:] or [type(error).__name__])[0]


def load_local_batch(uris: Sequence[str], config: PreprocessConfig, reader, gpu_decode: bool = True,
                     sizes: Optional[Sequence[Optional[int]]] = None, progress: Optional[Callable[[], None]] = None,
                     fell_back: Optional[Callable[[int, str], None]] = None) -> List[Decoded]:
    """:func:`load_image` of each local file, their bytes read together by ``reader`` where the rules allow.

    A file whose size the caller knows from its own ``stat`` of a regular file (``sizes``; the job's check makes
    one for every input) is not ``stat``ed again; every other one is ``stat``ed here, as :func:`load_image` does,
    so anything but a regular file gets its reason without being opened. Any file over the size limit is refused
    unread. The rest, up to :data:`TOGETHER_MAX_FILE_BYTES` each, are read in groups by ``reader`` (on DALI's
    threads, which take no GIL: :mod:`images.dali_file_reader`) and then screened or decoded exactly as a file
    read alone; larger ones are read alone.

    Whatever happened to a file since its ``stat`` gets the outcome reading it alone gives: a group whose read fails
    (a file removed or shrunk since, no permission, no DALI) is read again one file at a time with
    :func:`load_image`, and so is any file whose bytes do not number the size its ``stat`` found (it grew, or was
    replaced by a device or a much larger file, or its filesystem reports sizes it does not hold). What a stale
    size cannot prevent, as with any ``stat`` before a read: a file swapped for a FIFO blocks the read until the
    caller's watchdog gives it up, and a file that grew is read whole before its size is compared (docs/dali.md).
    No time limit applies here: the caller watches the whole call (``transforms.images``) and reads a stalled
    group again one file at a time.

    Args:
        uris: Local paths (no URLs).
        config: Preprocessing sizes and limits.
        reader: A :class:`images.dali_file_reader.DaliFileReader` (or any object with ``read(paths) ->
            [bytes]`` and ``max_files``).
        gpu_decode: As for :func:`load_image`. Default True.
        sizes: Per uri, its size from the caller's ``stat`` of it as a regular file, or None to ``stat`` it
            here. Default None: ``stat`` each.
        progress: Called once each time a file's outcome is settled (a caller's watchdog sees progress).
            Default None.
        fell_back: Called with (files, reason) each time files are read again one at a time. Default None.

    Returns:
        One :class:`Decoded` per uri, in order. Each one's ``read_s`` is its ``stat`` here (if any) plus an
        equal share of its group's read.
    """
    results: List[Optional[Decoded]] = [None] * len(uris)
    stat_s: List[float] = [0.0] * len(uris)
    together: List[Tuple[int, int]] = []

    def settle(i: int, decoded: Decoded) -> None:
        results[i] = decoded
        if progress is not None:
            progress()

    def alone(indexes: Sequence[int], reason: str) -> None:
        if fell_back is not None:
            fell_back(len(indexes), reason)
        for i in indexes:
            settle(i, load_image(uris[i], config, gpu_decode, read_timeout_s=None))

    for i, uri in enumerate(uris):
        start = time.perf_counter()
        refused, size = readable_size(uri, config, sizes[i] if sizes is not None else None)
        stat_s[i] = time.perf_counter() - start
        if refused is not None:
            settle(i, Decoded(None, refused, "read", stat_s[i], 0.0, 0))
        elif size is None or size > TOGETHER_MAX_FILE_BYTES:
            settle(i, load_image(uri, config, gpu_decode, read_timeout_s=None))
        else:
            together.append((i, size))
    expected = dict(together)
    for group in _read_groups(together, reader.max_files):
        start = time.perf_counter()
        paths = [uris[i] for i in group]
        try:
            with IN_FLIGHT.track(f"{paths[0]} (one of {len(group)} files read together)"):
                datas = reader.read(paths)
            if len(datas) != len(group):
                raise RuntimeError(f"the reader returned {len(datas)} files for {len(group)}")
        except Exception as e:  # ImportError, RuntimeError from DALI: each file read alone gives its own reason
            alone(group, _reason_line(e, paths))
            continue
        share = (time.perf_counter() - start) / len(group)
        changed = []
        for i, data in zip(group, datas):
            if len(data) != expected[i]:
                changed.append(i)
            else:
                settle(i, screen_or_decode(data, config, gpu_decode, stat_s[i] + share))
        if changed:
            alone(changed, f"{len(changed)} file(s) no longer the size their stat found, first {uris[changed[0]]}")
    return results  # type: ignore[return-value]  # every index was set above


def screen_or_decode(data: bytes, config: PreprocessConfig, gpu_decode: bool, read_s: float) -> Decoded:
    """One read file's :class:`Decoded`: left encoded for the GPU decoder where ``gpu_decode`` and the
    pre-screen pass it, else decoded with Pillow (or its reason); ``read_s`` is what reading it took."""
    read_done = time.perf_counter()
    if gpu_decode:
        screened = screen(data, config.max_pixels)
        if screened.route == GPU:
            return Decoded(None, None, "decode", read_s, time.perf_counter() - read_done, len(data), data,
                           crop_box(screened.width, screened.height, config))
    try:
        array, error = preprocess_image(data, config), None
    except BadImageError as e:
        array, error = None, str(e)
    except MemoryError:
        array, error = None, (f"decoding it ({len(data) / 2**20:.1f} MiB encoded) needs more memory than this worker "
                              f"has; lower --max_pixels to refuse images this large, or remove it from the input")
    except Exception as e:  # a decoder bug on a malformed file must not stop the job either
        array, error = None, f"unexpected decoder error on a malformed file ({type(e).__name__}: {e})"
    return Decoded(array, error, "decode", read_s, time.perf_counter() - read_done, len(data))
