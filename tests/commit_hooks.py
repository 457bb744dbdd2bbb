"""Runs ``pipelines.classify_images`` with a test-only hook on every change it makes under one folder.

The tests that prove the commit protocol need the job to die, or the disk to fill, at exact points
of its writes and its commit, and a run to wait at its commit while another finishes. Nothing in
the production code knows about this: the hook wraps the filesystem calls of this process (the
DirectRunner runs the pipeline in it) and counts each one that changes something under FOLDER::

    python -m tests.commit_hooks count FOLDER -- ARGS...   prints "mutations N" at exit
    python -m tests.commit_hooks kill N FOLDER -- ARGS...  SIGKILLs itself at the Nth change
    python -m tests.commit_hooks full N FOLDER -- ARGS...  the Nth change and every later write
                                                           fail with ENOSPC (a full disk)
    python -m tests.commit_hooks pause GATE FOLDER -- ARGS...
        before the run replaces FOLDER/_SUCCESS, writes GATE.waiting and waits for GATE to exist

Changes counted: opening a file for writing, rename/replace, remove/unlink, rmdir, mkdir, fsync
of a file under FOLDER, and ``shutil.rmtree``. The point is taken *before* the change happens.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import signal
import sys
import threading
import time

_LOCK = threading.Lock()
_COUNT = 0
_FDS: dict = {}


def _under(path, folder: str) -> bool:
    try:
        path = os.fsdecode(path)
    except TypeError:
        return False
    if "://" in folder or "://" in path:
        return path == folder or path.startswith(folder.rstrip("/") + "/")
    return os.path.abspath(path).startswith(folder + os.sep) or os.path.abspath(path) == folder


def install(mode: str, arg: str, folder: str) -> None:
    folder = folder if "://" in folder else os.path.abspath(folder)
    limit = int(arg) if mode in ("kill", "full") else None
    full = [False]

    def point(what: str) -> None:
        global _COUNT
        with _LOCK:
            _COUNT += 1
            n = _COUNT
        if mode == "count" and os.environ.get("COMMIT_HOOKS_LIST"):
            sys.stderr.write(f"commit_hooks: change {n}: {what}\n")
        if mode == "kill" and n == limit:
            sys.stderr.write(f"commit_hooks: SIGKILL at change {n} ({what})\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "full" and (n >= limit or full[0]):
            full[0] = True
            raise OSError(errno.ENOSPC, "No space left on device (commit_hooks)", what)

    def wrap(fn, name, is_write=lambda *a, **k: True, paths=1):
        def wrapped(*args, **kwargs):
            if args and any(_under(p, folder) for p in args[:paths]) and is_write(*args, **kwargs):
                point(f"{name} {args[:paths]}")
            return fn(*args, **kwargs)
        return wrapped

    def writing(file, mode="r", *a, **k):
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    builtins.open = io.open = wrap(io.open, "open", writing)
    os.replace = wrap(os.replace, "replace", paths=2)
    os.rename = wrap(os.rename, "rename", paths=2)
    os.remove = wrap(os.remove, "remove")
    os.unlink = wrap(os.unlink, "unlink")
    os.rmdir = wrap(os.rmdir, "rmdir")
    os.mkdir = wrap(os.mkdir, "mkdir")
    shutil.rmtree = wrap(shutil.rmtree, "rmtree")
    real_open, real_fsync = os.open, os.fsync

    def os_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        if _under(path, folder):
            _FDS[fd] = os.fsdecode(path)
        return fd

    def fsync(fd):
        target = _FDS.get(fd if isinstance(fd, int) else fd.fileno())
        if target is not None or (not isinstance(fd, int) and _under(getattr(fd, "name", ""), folder)):
            point(f"fsync {target}")
        return real_fsync(fd)

    os.open, os.fsync = os_open, fsync

    if mode == "pause":
        from engines import storage

        real_replace_if = storage.replace_if

        def replace_if(path, *a, **k):
            if _under(path, folder):
                open(arg + ".waiting", "w").close()
                deadline = time.monotonic() + 300
                while not os.path.exists(arg) and time.monotonic() < deadline:
                    time.sleep(0.05)
            return real_replace_if(path, *a, **k)

        storage.replace_if = replace_if


def main(argv) -> int:
    split = argv.index("--")
    head, args = argv[:split], argv[split + 1:]
    if head[0] == "count":
        mode, arg, folder = "count", None, head[1]
    else:
        mode, arg, folder = head
    install(mode, arg, folder)
    from pipelines import classify_images

    try:
        return classify_images.main(args)
    finally:
        if mode == "count":
            print(f"mutations {_COUNT}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
