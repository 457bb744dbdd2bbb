"""One inter-process lock for the TensorRT helpers: plan builds (engine cache) and timing-cache merges."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time

from engines.base import EngineError


@contextlib.contextmanager
def machine_lock(name: str, timeout_s: float, holder: str):
    """An exclusive lock shared by every process on this machine (``fcntl.flock`` on a temp file).

    Args:
        name: What is locked (a cache key or a path); hashed into the lock file's name.
        timeout_s: How long to wait before giving up.
        holder: What the other process is doing, for the error ("building the plan X").

    Raises:
        EngineError: the lock was not free within ``timeout_s``, naming the lock file to remove.
    """
    import fcntl

    lock_dir = os.path.join(tempfile.gettempdir(), "engines-tensorrt-locks")
    os.makedirs(lock_dir, exist_ok=True)
    lock_path = os.path.join(lock_dir, hashlib.sha256(name.encode("utf-8")).hexdigest()[:32] + ".lock")
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineError(f"Waited {timeout_s:.0f} s for another process {holder}; remove {lock_path} "
                                      f"if none is running") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
