"""``lstat`` that keeps the GIL, for checks that stat every input on a thread the job waits for.

Python's ``os.lstat`` lets go of the GIL for its system call and must win it back afterwards. Beside threads
running Python, winning it back can take up to the interpreter's switch interval (5 ms), whatever the call
took: on an H100 host the job's check (``transforms.scored``) spent 2.6 s of its bundle thread's ~8 s on one
``lstat`` per file, 0.19 s of it holding the GIL (benchmarks/NOTES.md). A local ``statx`` takes about a
microsecond, so holding the GIL through it costs the other threads less than the bundle thread's wait.

:func:`lstat` calls glibc's ``statx`` through ``ctypes.PyDLL``, which keeps the GIL for the call, and returns
what ``os.lstat`` would: the same mode, size and ``st_mtime`` (computed as CPython computes it). Everything
unusual goes to ``os.lstat`` itself, so errors and edge cases are Python's own:

* a failed call (a missing file, no permission, a name too long) is repeated with ``os.lstat``, which raises
  the ``OSError`` Python users expect;
* a name holding a NUL byte (which C would cut short) goes to ``os.lstat``, which raises ``ValueError``;
* a platform without ``statx`` (not glibc 2.28+, not Linux, a kernel or sandbox answering ``ENOSYS`` or, under
  seccomp, ``EPERM``) uses ``os.lstat`` throughout.

A slow filesystem (NFS, a FUSE mount of a bucket) can take milliseconds per call, and holding the GIL that
long would stall every other Python thread. The first call that takes longer than :data:`SLOW_S` switches
this process to ``os.lstat`` for good, with one log line naming the file.

Thread-safety: :func:`lstat` may be called from any thread; each call has its own buffer. The switch to
``os.lstat`` is one module-level flag, written once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import time
from typing import Iterator, NamedTuple

_LOG = logging.getLogger(__name__)

#: A held call taking longer than this marks the filesystem as slow: from then on this process lets go of the
#: GIL for each call, as ``os.lstat`` does. A local ``statx`` takes ~1 us; 1 ms is a network round trip.
SLOW_S = 0.001

_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
#: ``STATX_TYPE | STATX_MODE | STATX_SIZE | STATX_MTIME``: what the caller reads, and what the answer must hold.
_WANTED = 0x1 | 0x2 | 0x200 | 0x40
#: ``struct statx`` (linux/stat.h, a stable kernel ABI): 256 bytes; ``stx_mask`` (u32) at 0, ``stx_mode`` (u16)
#: at 28, ``stx_size`` (u64) at 40, ``stx_mtime`` ({s64 tv_sec; u32 tv_nsec}) at 112. One unpack reads all four.
_SIZE = 256
_FIELDS = struct.Struct("=I24xH10xQ64xqI")


class Stat(NamedTuple):
    """The fields of ``os.lstat``'s answer that the job's check reads, under the same names."""

    st_mode: int
    st_size: int
    st_mtime: float


_statx = None  # the bound C function once loaded; False where it cannot be used


def _load():
    """glibc's ``statx`` as a GIL-holding ctypes function, or False where there is none."""
    try:
        libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the call keeps the GIL
        function = libc.statx
    except (OSError, AttributeError):  # not glibc 2.28+, not Linux
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


def _fallback(path: str) -> Stat:
    st = os.lstat(path)
    return Stat(st.st_mode, st.st_size, st.st_mtime)


def held_available() -> bool:
    """Whether calls keep the GIL in this process now (False on other platforms or after a slow call)."""
    global _statx
    if _statx is None:
        _statx = _load()
    return bool(_statx)


@contextlib.contextmanager
def letting_go() -> Iterator[None]:
    """Within the block, :func:`lstat` lets go of the GIL for each call, as ``os.lstat`` does; afterwards it is as
    before. For benchmarks and tests that time or check both ways in one process (not for the job: the flag is
    the process's)."""
    global _statx
    before = _statx
    _statx = False
    try:
        yield
    finally:
        _statx = before


def lstat(path: str) -> Stat:
    """``os.lstat(path)``'s mode, size and modification time, holding the GIL where that is safe (module doc).

    Raises:
        OSError: as ``os.lstat`` raises it (the file is missing, unreadable, ...).
        ValueError: the name holds a NUL byte.
    """
    global _statx
    if _statx is None:
        _statx = _load()
    if not _statx:
        return _fallback(path)
    name = os.fsencode(path)
    if b"\0" in name:
        return _fallback(path)
    buffer = ctypes.create_string_buffer(_SIZE)
    start = time.perf_counter()
    failed = _statx(_AT_FDCWD, name, _AT_SYMLINK_NOFOLLOW, _WANTED, buffer)
    took = time.perf_counter() - start
    if took > SLOW_S and _statx:
        _statx = False
        _LOG.info("Stating %s took %.1f ms; this process now lets go of the GIL for each stat, as os.lstat does "
                  "(a slow filesystem)", path, took * 1e3)
    if failed and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        _statx = False  # a kernel or sandbox without statx (seccomp answers EPERM): os.lstat from now on
    if failed:
        return _fallback(path)  # the error as Python gives it
    mask, mode, size, sec, nsec = _FIELDS.unpack_from(buffer)
    if mask & _WANTED != _WANTED:
        return _fallback(path)  # an answer without these fields (a filesystem that cannot give them)
    # CPython's st_mtime: ``sec + nsec * 1e-9`` in double precision (Modules/posixmodule.c, fill_time).
    return Stat(mode, size, sec + nsec * 1e-9)
