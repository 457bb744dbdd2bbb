"""``lstat`` that keeps the GIL on local filesystems, for checks that stat every input on a thread the job waits for.

Python's ``os.lstat`` lets go of the GIL for its system call and must win it back afterwards. Beside threads
running Python, winning it back can take up to the interpreter's switch interval (5 ms), whatever the call
took: on an H100 host the job's check (``transforms.scored``) spent 2.6 s of its bundle thread's ~8 s on one
``lstat`` per file, 0.19 s of it holding the GIL (benchmarks/NOTES.md). A ``statx`` on a local filesystem takes
about a microsecond, so holding the GIL through it costs the other threads less than the bundle thread's wait.

:func:`lstat` calls glibc's ``statx`` through ``ctypes.PyDLL``, which keeps the GIL for the call, and returns
what ``os.lstat`` would: the same mode, size and ``st_mtime`` (computed as CPython computes it). Everything
unusual goes to ``os.lstat`` itself, so errors and edge cases are Python's own:

* a failed call (a missing file, no permission, a name too long) is repeated with ``os.lstat``, which raises
  the ``OSError`` Python users expect;
* a name holding a NUL byte (which C would cut short) goes to ``os.lstat``, which raises ``ValueError``;
* an answer without the mode, size or modification time (a filesystem that cannot give one) goes to ``os.lstat``;
* a platform without ``statx`` (not glibc 2.28+, not Linux, a kernel or sandbox answering ``ENOSYS`` or, under
  seccomp, ``EPERM``) uses ``os.lstat`` throughout.

Only a file whose folder lies on a local filesystem (:data:`LOCAL_FILESYSTEMS`) is stat'ed holding the GIL.
On NFS or a FUSE mount of a bucket a call can take milliseconds, or hang with the server, and holding the GIL
through it would stop every other Python thread of the worker (the readers' watchdog among them), where
``os.lstat`` stops only its caller. Each folder's filesystem is found once (:func:`folder_is_local`): its device
number from an ``os.stat`` that lets go of the GIL, looked up in ``/proc/self/mountinfo``. A folder whose
filesystem cannot be found is treated as not local. (A file that is itself a mount point, bind-mounted into a
local folder, is taken as local: input images are not mounted one by one.)

The facts this relies on (ctypes, ``struct statx``, CPython's ``st_mtime``, the mount table), with their
sources and the tests that check them: docs/held-stat.md.

Thread-safety: :func:`lstat` may be called from any thread: each call has its own buffer, the folder decisions
are a dict that threads fill with the same answers, and the mount table is read under a lock.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import threading
from typing import Dict, Iterator, NamedTuple

#: Filesystems a ``statx`` answers from the machine itself, without a network round trip or a user-space server.
#: overlay is a container's root (Docker, Dataflow's workers); tmpfs and ramfs live in memory.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "overlay", "tmpfs", "ramfs",
                               "squashfs", "vfat", "exfat"})
#: Where the kernel lists this process's mounts with their device numbers and filesystem types.
MOUNTINFO = "/proc/self/mountinfo"
#: How many folders' decisions are kept; past it they are forgotten and found again (an ``os.stat`` each).
MAX_FOLDERS = 65536

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
_letting_go = 0  # open letting_go() blocks: while any is open, every call lets go of the GIL
_folders: Dict[str, bool] = {}  # folder as given -> whether its files are stat'ed holding the GIL
_mounts: Dict[int, str] = {}  # device number -> filesystem type, from MOUNTINFO
_mounts_lock = threading.Lock()


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


def _function():
    """The GIL-holding ``statx``, or False where calls let go of the GIL (read once per call: another thread
    may switch it off meanwhile)."""
    global _statx
    function = _statx
    if function is None:
        function = _statx = _load()
    return function if not _letting_go else False


def held_available() -> bool:
    """Whether calls on a local filesystem keep the GIL in this process now (False on other platforms, after a
    kernel refused ``statx``, or inside :func:`letting_go`)."""
    return bool(_function())


def _read_mounts() -> Dict[int, str]:
    mounts = {}
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if not sep or len(fields) < 3 or not right.split():
                    continue
                major, _, minor = fields[2].partition(":")
                if major.isdigit() and minor.isdigit():
                    mounts[os.makedev(int(major), int(minor))] = right.split()[0]
    except OSError:  # no /proc: nothing is known to be local
        pass
    return mounts


def _filesystem(device: int) -> str:
    """The type of the filesystem with this device number ("" when unknown); the mount table is read again
    when a device is not in it (a filesystem mounted since)."""
    global _mounts
    with _mounts_lock:
        if device not in _mounts:
            _mounts = _read_mounts()
        return _mounts.get(device, "")


def folder_is_local(folder: str) -> bool:
    """Whether files in ``folder`` are stat'ed holding the GIL: whether the folder (symbolic links followed, as
    the kernel follows them to reach a file in it) lies on a filesystem in :data:`LOCAL_FILESYSTEMS`. Kept per
    folder as spelled, so a relative folder is taken from the working directory when first seen."""
    local = _folders.get(folder)
    if local is None:
        try:
            local = _filesystem(os.stat(folder or ".").st_dev) in LOCAL_FILESYSTEMS
        except (OSError, ValueError):  # a folder that is missing or unreadable: its files' errors come from os.lstat
            local = False
        if len(_folders) >= MAX_FOLDERS:
            _folders.clear()
        _folders[folder] = local
    return local


@contextlib.contextmanager
def letting_go() -> Iterator[None]:
    """Within the block, :func:`lstat` lets go of the GIL for each call, as ``os.lstat`` does, in every thread;
    afterwards it is as before. For benchmarks and tests that time or check both ways in one process (blocks
    are entered from one thread at a time: the count is not locked)."""
    global _letting_go
    _letting_go += 1
    try:
        yield
    finally:
        _letting_go -= 1


def _fallback(path: str) -> Stat:
    st = os.lstat(path)
    return Stat(st.st_mode, st.st_size, st.st_mtime)


def lstat(path: str) -> Stat:
    """``os.lstat(path)``'s mode, size and modification time, holding the GIL where that is safe (module doc).

    Raises:
        OSError: as ``os.lstat`` raises it (the file is missing, unreadable, ...).
        ValueError: the name holds a NUL byte.
    """
    global _statx
    function = _function()
    if not function or not isinstance(path, str) or "\0" in path or not folder_is_local(os.path.dirname(path)):
        return _fallback(path)
    buffer = ctypes.create_string_buffer(_SIZE)
    if function(_AT_FDCWD, os.fsencode(path), _AT_SYMLINK_NOFOLLOW, _WANTED, buffer):
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
            _statx = False  # a kernel or sandbox without statx (seccomp answers EPERM): os.lstat from now on
        return _fallback(path)  # the error as Python gives it
    mask, mode, size, sec, nsec = _FIELDS.unpack_from(buffer)
    if mask & _WANTED != _WANTED:
        return _fallback(path)
    # CPython's st_mtime: ``sec + nsec * 1e-9`` in double precision (Modules/posixmodule.c, fill_time).
    return Stat(mode, size, sec + nsec * 1e-9)
