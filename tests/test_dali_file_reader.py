"""images.dali_file_reader: many local files read in one call on DALI's threads, with the real DALI (CPU only)."""

import os
import threading

import pytest

from tests.conftest import jpeg_bytes, photo

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")


def _files(directory, count):
    paths = []
    for i in range(count):
        path = directory / f"{i:03d}.jpg"
        path.write_bytes(jpeg_bytes(photo("astronaut")[i:40 + 3 * i, 2 * i:60 + i]))  # each another size
        paths.append(str(path))
    return paths


def test_reads_every_file_whole_and_in_order_across_runs(tmp_path):
    from images.dali_file_reader import DaliFileReader

    paths = _files(tmp_path, 7)
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths.insert(3, str(tmp_path / "empty.jpg"))
    reader = DaliFileReader(threads=2, max_files=3)  # 8 files: three runs, the last one short
    assert reader.read(paths) == [open(p, "rb").read() for p in paths]
    assert reader.read(paths[::-1]) == [open(p, "rb").read() for p in paths[::-1]]


def test_a_file_that_cannot_be_read_fails_the_call_naming_it_and_the_next_call_works(tmp_path):
    from images.dali_file_reader import DaliFileReader

    paths = _files(tmp_path, 3)
    reader = DaliFileReader(threads=2)
    with pytest.raises(RuntimeError, match="gone.jpg"):
        reader.read(paths[:1] + [str(tmp_path / "gone.jpg")] + paths[1:])
    # DALI leaves a pipeline unusable after a failed run: the reader builds a new one.
    assert reader.read(paths) == [open(p, "rb").read() for p in paths]


def test_threads_reading_at_once_each_get_their_own_files(tmp_path):
    from images.dali_file_reader import DaliFileReader

    reader = DaliFileReader(threads=2, max_files=8)
    lists = [_files(tmp_path / str(t), 20) for t in range(4) if not os.makedirs(tmp_path / str(t))]
    got, failures = {}, []

    def read(t):
        try:
            got[t] = [reader.read(lists[t]) for _ in range(5)]
        except Exception as e:  # reported below, with the thread
            failures.append((t, e))

    threads = [threading.Thread(target=read, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    for t, files in enumerate(lists):
        want = [open(p, "rb").read() for p in files]
        assert got[t] == [want] * 5


def test_bad_arguments_are_refused():
    from images.dali_file_reader import DaliFileReader

    with pytest.raises(ValueError, match="threads >= 1"):
        DaliFileReader(threads=0)


def test_a_path_with_a_nul_byte_is_refused_not_cut_short(tmp_path):
    from images.dali_file_reader import DaliFileReader

    (path,) = _files(tmp_path, 1)
    with pytest.raises(ValueError, match="NUL byte"):
        DaliFileReader(threads=1).read([path + "\0.bak"])
