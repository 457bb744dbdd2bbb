"""engines/storage.py: whole-file reads and writes, local and on Beam filesystems."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    # A file-size limit makes the write fail with EFBIG, as a full disk fails it with ENOSPC; run in a
    # child process so the limit binds nothing else. Python ignores SIGXFSZ, so the write raises.
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from engines import storage
from engines.base import EngineError
try:
    storage.write_bytes({str(tmp_path / "stats.png")!r}, b"x" * 100_000)
except EngineError as e:
    print(e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"Cannot write {tmp_path / 'stats.png'}" in proc.stdout and "File too large" in proc.stdout
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_a_file_too_large_to_hold_is_named_by_its_size(tmp_path):
    # A 30 GiB sparse file (no disk used) read under a 4 GiB address-space limit: MemoryError, as a
    # mistaken --labels_file or --model on a machine with less memory would give.
    huge = tmp_path / "labels.txt"
    with open(huge, "wb") as f:
        f.truncate(30 << 30)
    script = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from engines import storage
from engines.base import EngineError
try:
    storage.read_bytes({str(huge)!r}, "--labels_file")
except EngineError as e:
    print(e)
    sys.exit(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"--labels_file {huge} is 30.0 GiB, more than this machine can hold in memory" in proc.stdout, proc.stdout
