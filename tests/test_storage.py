"""engines/storage.py: whole-file reads and writes, local and on Beam filesystems."""

from __future__ import annotations

import os
import re
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


def test_join_is_os_path_join_locally_and_one_slash_per_part_for_urls():
    from engines import storage

    assert storage.join("scored/dt=1", "run-7", "stats.json") == os.path.join("scored/dt=1", "run-7", "stats.json")
    assert storage.join("gs://b/scored/", "run-7/", "/stats.json") == "gs://b/scored/run-7/stats.json"
    # A manifest's relative entry, joined to its folder: a trailing slash stays, as os.path.join keeps it.
    assert storage.join("gs://b/lists/", "photos/a.jpg") == "gs://b/lists/photos/a.jpg"
    assert storage.join("gs://b/lists", "photos/") == "gs://b/lists/photos/"
    assert storage.join("gs://b/a//b", "c") == "gs://b/a//b/c"  # object names may hold //


def test_is_url_tells_local_paths_from_urls():
    from engines import storage

    assert [storage.is_url(p) for p in ("gs://b/x.jpg", "s3://b/x", "file:///tmp/x", "/tmp/x", "photos/x.jpg")] == \
        [True, True, True, False, False]


def test_read_returns_the_bytes_and_leaves_the_wording_of_errors_to_the_caller(tmp_path):
    import pytest

    from engines import storage
    from engines.base import EngineError

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8 not much of a JPEG")
    assert storage.read(str(tmp_path / "a.jpg")) == b"\xff\xd8 not much of a JPEG"
    # The image reader turns the filesystem's own error into a dead letter; a model file gets a sentence.
    with pytest.raises(FileNotFoundError):
        storage.read(str(tmp_path / "missing.jpg"))
    with pytest.raises(EngineError, match=r"^--labels_file not found: .*missing.txt\. Pass the path of an existing"):
        storage.read_bytes(str(tmp_path / "missing.txt"), "--labels_file")


def test_a_local_read_returns_the_whole_file_whatever_size_the_caller_saw(tmp_path):
    # The size from the caller's stat is a hint: a file that grew or shrank since is still read whole.
    import pytest

    from engines import storage

    data = bytes(range(256)) * 1000
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    for hint in (None, len(data), 0, 10, len(data) - 1, len(data) * 3):
        assert storage.read_local(str(path), hint) == data, hint
        assert storage.read(str(path), hint) == data, hint
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert storage.read_local(str(tmp_path / "empty.jpg"), 100) == b""
    with pytest.raises(IsADirectoryError, match=re.escape(str(tmp_path))):  # the message names the file
        storage.read_local(str(tmp_path), None)
    with pytest.raises(FileNotFoundError):
        storage.read_local(str(tmp_path / "missing.jpg"), 3)


def test_a_file_larger_than_one_read_is_read_into_one_buffer(tmp_path, monkeypatch):
    # Linux returns at most ~2 GiB a read(): reading such a file in parts and joining them would hold two
    # copies at once (an ONNX model's external data is that large), so it is read as Python reads it.
    from engines import storage

    data = os.urandom(5000)
    (tmp_path / "model.onnx.data").write_bytes(data)
    monkeypatch.setattr(storage, "ONE_READ_MAX_BYTES", 4096)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert storage.read_local(str(tmp_path / "model.onnx.data"), len(data)) == data
    assert storage.read_local(str(tmp_path / "model.onnx.data"), None) == data
    assert reads == []


def test_reading_an_image_stats_it_once_and_leaves_no_file_open(tmp_path, monkeypatch):
    # Every system call a reader thread makes gives up the GIL and waits to win it back beside the bundle
    # thread: the regular-file check and the size limit share one stat, and the read makes no other.
    from PIL import Image

    from images.pillow_decoder import PreprocessConfig
    from images.reading import load_image

    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    stats = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: stats.append(p) or real_stat(p, *a, **k))
    fds_before = len(os.listdir("/proc/self/fd"))
    loaded = load_image(str(path), PreprocessConfig(), gpu_decode=True, read_timeout_s=None)
    assert loaded.error is None and loaded.encoded == path.read_bytes()
    assert stats == [str(path)]
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_canonical_files_spells_every_file_as_canonical_does(tmp_path, monkeypatch):
    """The batch form resolves a folder once for its files; every spelling must still be canonical's: a
    symlinked folder, a file that is itself a link (to another folder), '..', relative names, a file that
    does not exist, URLs."""
    from engines import storage

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "a.jpg").write_bytes(b"a")
    (real / "sub" / "b.jpg").write_bytes(b"b")
    (tmp_path / "linked").symlink_to(real)
    (real / "link.jpg").symlink_to(real / "sub" / "b.jpg")
    monkeypatch.chdir(tmp_path)
    paths = [str(real / "a.jpg"), str(tmp_path / "linked" / "a.jpg"), str(tmp_path / "linked" / "link.jpg"),
             str(tmp_path / "linked" / "sub" / ".." / "a.jpg"), "linked/sub/b.jpg", "real//a.jpg",
             str(real / "missing.jpg"), "gs://Bucket/x.jpg/", "GS://b/a//b.jpg", str(tmp_path / "linked") + "/"]
    assert storage.canonical_files(paths) == [storage.canonical(p) for p in paths]
    assert storage.canonical_files(paths)[2] == str(real / "sub" / "b.jpg")  # the link's target, not its folder
    assert storage.canonical_files([]) == []


def test_canonical_files_refuses_a_nul_byte_as_canonical_does():
    import pytest

    from engines import storage

    with pytest.raises(ValueError):
        storage.canonical("/tmp/a\0b.jpg")
    with pytest.raises(ValueError):
        storage.canonical_files(["/tmp/ok.jpg", "/tmp/a\0b.jpg"])
