"""images.reading.load_local_batch: files read together by DALI give each file exactly what reading it alone gives."""

import os

import numpy as np
import pytest

from images.pillow_decoder import PreprocessConfig

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")


def _inputs(corpus, tmp_path):
    directory, good, broken = corpus
    paths = list(good) + [os.path.join(directory, name) for name in sorted(broken)]
    os.mkfifo(tmp_path / "pipe.jpg")  # opened, it would block until a writer appears
    (tmp_path / "folder.jpg").mkdir()
    return paths + [str(tmp_path / "pipe.jpg"), str(tmp_path / "folder.jpg"), str(tmp_path / "missing.jpg"),
                    "/dev/null"]


def _same(a, b) -> bool:
    arrays = (a.array is None and b.array is None) or np.array_equal(a.array, b.array)
    return arrays and (a.error, a.stage, a.encoded, a.box, a.nbytes) == (b.error, b.stage, b.encoded, b.box, b.nbytes)


class RecordingReader:
    """The real DALI reader, noting which files each call read."""

    def __init__(self, max_files=256):
        from images.dali_file_reader import DaliFileReader

        self._reader = DaliFileReader(threads=2, max_files=max_files)
        self.max_files = max_files
        self.calls = []

    def read(self, paths):
        self.calls.append(list(paths))
        return self._reader.read(paths)


@pytest.mark.parametrize("gpu_decode", [True, False])
def test_each_file_gets_what_reading_it_alone_gives(corpus, tmp_path, gpu_decode):
    from images.reading import load_image, load_local_batch

    config = PreprocessConfig()
    paths = _inputs(corpus, tmp_path)
    reader = RecordingReader()
    together = load_local_batch(paths, config, reader, gpu_decode)
    alone = [load_image(path, config, gpu_decode, read_timeout_s=None) for path in paths]
    for path, a, b in zip(paths, together, alone):
        assert _same(a, b), (path, a.error, b.error)
    assert sum(b.encoded is not None for b in alone) == (12 if gpu_decode else 0)
    assert sum(b.error is not None for b in alone) == len(paths) - 12
    # One read for every regular file; the FIFO, the folder, the device and the missing file are never opened.
    (call,) = reader.calls
    assert sorted(call) == sorted(p for p in paths if os.path.isfile(p))


def test_sizes_the_caller_found_skip_the_stat_and_the_limit_still_holds(corpus, tmp_path, monkeypatch):
    import images.reading as reading

    config = PreprocessConfig(max_pixels=1 << 20)
    paths = [p for p in _inputs(corpus, tmp_path) if os.path.isfile(p)]
    sizes = [os.stat(p).st_size for p in paths]
    sizes[0] = reading.max_file_bytes(config.max_pixels) + 1  # as the caller's stat found it
    stats = []
    monkeypatch.setattr(reading, "regular_file_size", lambda path: stats.append(path) or (None, None))
    reader = RecordingReader()
    got = reading.load_local_batch(paths, config, reader, True, sizes)
    assert stats == []
    assert got[0].stage == "read" and "--max_pixels 1048576" in got[0].error and paths[0] not in reader.calls[0]
    monkeypatch.undo()
    for path, a in zip(paths[1:], got[1:]):
        assert _same(a, reading.load_image(path, config, True, read_timeout_s=None)), path


def test_a_group_that_fails_is_read_one_file_at_a_time_each_with_its_reason(corpus, tmp_path):
    import images.reading as reading

    config = PreprocessConfig()
    directory, good, _ = corpus
    gone = tmp_path / "gone.jpg"
    paths = good[:3] + [str(gone)] + good[3:6]
    sizes = [os.stat(p).st_size if p != str(gone) else 1000 for p in paths]  # it was there at the caller's stat
    reader = RecordingReader()
    got = reading.load_local_batch(paths, config, reader, True, sizes)
    assert len(reader.calls) == 1  # DALI's read failed on it; the group was read again by Python
    assert (got[3].stage, got[3].error) == ("read", "cannot read file (file not found; check the path exists)")
    for path, a in zip(paths[:3] + paths[4:], got[:3] + got[4:]):
        assert _same(a, reading.load_image(path, config, True, read_timeout_s=None)), path
        assert a.encoded is not None


def test_large_files_are_read_alone_and_groups_hold_a_bounded_number_of_bytes(corpus, monkeypatch):
    import images.reading as reading

    config = PreprocessConfig()
    good = corpus[1]
    sizes = {p: os.stat(p).st_size for p in good}
    biggest = max(good, key=sizes.get)
    monkeypatch.setattr(reading, "TOGETHER_MAX_FILE_BYTES", sizes[biggest] - 1)
    monkeypatch.setattr(reading, "TOGETHER_MAX_BYTES", 2 * sizes[biggest])
    reader = RecordingReader(max_files=4)
    got = reading.load_local_batch(good, config, reader, True)
    read = [p for call in reader.calls for p in call]
    assert biggest not in read and sorted(read) == sorted(p for p in good if p != biggest)
    assert all(len(call) <= 4 and sum(sizes[p] for p in call) <= 2 * sizes[biggest] for call in reader.calls)
    assert [p for call in reader.calls for p in call] == [p for p in good if p != biggest]  # in order
    for path, a in zip(good, got):
        assert _same(a, reading.load_image(path, config, True, read_timeout_s=None)), path


def test_read_groups_split_by_count_and_bytes():
    from images.reading import TOGETHER_MAX_BYTES, _read_groups

    assert _read_groups([(0, 10), (1, 10), (2, 10)], 2) == [[0, 1], [2]]
    assert _read_groups([(0, TOGETHER_MAX_BYTES - 5), (1, 10), (2, 5)], 9) == [[0], [1, 2]]
    assert _read_groups([], 3) == []


def test_a_file_changed_since_its_stat_gets_what_reading_it_alone_gives(corpus, tmp_path):
    import images.reading as reading

    config = PreprocessConfig(max_pixels=1 << 20)
    good = corpus[1][:4]
    grown = tmp_path / "grown.jpg"  # checked at 1 KB, then written whole: larger than the limit now
    grown.write_bytes(b"\xff\xd8\xff" + bytes(reading.max_file_bytes(config.max_pixels)))
    device = tmp_path / "device.jpg"  # a regular file at the check, a character device at the read
    os.symlink("/dev/zero", device)
    shrunk = tmp_path / "shrunk.jpg"
    shrunk.write_bytes(open(good[0], "rb").read()[:500])
    paths = [good[0], str(grown), good[1], str(device), str(shrunk), *good[2:]]
    sizes = [os.stat(p).st_size for p in good[:2]]
    sizes = [sizes[0], 1000, sizes[1], 1000, 600, *[os.stat(p).st_size for p in good[2:]]]
    fell_back, settled = [], []
    got = reading.load_local_batch(paths, config, RecordingReader(), True, sizes, lambda: settled.append(1),
                                   lambda files, reason: fell_back.append((files, reason)))
    for path, a in zip(paths, got):
        assert _same(a, reading.load_image(path, config, True, read_timeout_s=None)), path
    assert got[1].stage == "read" and "not read" in got[1].error
    assert got[3].stage == "read" and "character device" in got[3].error
    assert [a.encoded is not None for a in got] == [True, False, True, False, False, True, True]
    assert len(settled) == len(paths)
    (reread,) = fell_back
    assert reread[0] == 3 and str(grown) in reread[1]


def test_every_outcome_reports_progress_and_a_failed_group_says_which_file(corpus, tmp_path):
    import images.reading as reading

    good = corpus[1][:3]
    paths = [good[0], str(tmp_path / "gone.jpg"), *good[1:]]
    sizes = [os.stat(good[0]).st_size, 1000, *[os.stat(p).st_size for p in good[1:]]]
    fell_back, settled = [], []
    reading.load_local_batch(paths, PreprocessConfig(), RecordingReader(), True, sizes, lambda: settled.append(1),
                             lambda files, reason: fell_back.append((files, reason)))
    assert len(settled) == 4
    (reread,) = fell_back
    assert reread[0] == 4 and "gone.jpg" in reread[1]
