"""Servers the tests start as subprocesses (emulators, job services): stopping them."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """Terminates ``proc`` if it still runs, kills it if it has not exited after ``timeout_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
