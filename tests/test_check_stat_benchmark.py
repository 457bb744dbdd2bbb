"""The check's stat benchmark times both ways on real files, alone and beside busy threads, after checking that
they agree, and its second way really lets go of the GIL."""

import pytest

from engines import held_stat

needs_statx = pytest.mark.skipif(not held_stat._load(), reason="no glibc statx here: both ways would be os.lstat")


@pytest.fixture(autouse=True)
def fresh_module_state():
    held_stat._statx, held_stat._folders, held_stat._mounts = None, {}, {}
    yield
    held_stat._statx, held_stat._folders, held_stat._mounts = None, {}, {}


@needs_statx
def test_the_benchmark_times_held_and_letting_go_alone_and_beside_busy_threads(tmp_path, capsys):
    from benchmarks import check_stat

    real, calls = held_stat._load(), []

    def counting(*args):
        calls.append(args[1])
        return real(*args)

    held_stat._statx = counting
    for i in range(40):
        (tmp_path / f"{i:02d}.jpg").write_bytes(bytes([i]) * (100 + i))
    results = check_stat.main(["--input", str(tmp_path), "--files", "40", "--batch", "16", "--busy", "1",
                               "--rounds", "2"])
    assert sorted(results) == [0, 1]
    for busy in (0, 1):
        assert {name: len(rates) for name, rates in results[busy]["files_per_second"].items()} == {
            "held": 2, "letting_go": 2}
        assert results[busy]["ratio_held_vs_letting_go"] > 0
    assert "beside 1 busy threads, 32 files" in capsys.readouterr().out  # two whole batches of 16
    # Only the held way reached statx: 32 files in the agreement check, then 2 rounds alone and 2 beside.
    assert len(calls) == 32 * 5
    assert held_stat.held_available()  # the benchmark's letting go ended with it


def test_the_benchmark_refuses_a_platform_where_both_ways_would_be_the_same(tmp_path):
    from benchmarks import check_stat

    (tmp_path / "a.jpg").write_bytes(b"x")
    held_stat._statx = False
    with pytest.raises(SystemExit, match="no GIL-holding statx"):
        check_stat.main(["--input", str(tmp_path), "--files", "1", "--batch", "1"])


@needs_statx
def test_the_benchmark_refuses_a_folder_that_is_not_on_a_local_filesystem(tmp_path, monkeypatch):
    from benchmarks import check_stat

    (tmp_path / "a.jpg").write_bytes(b"x")
    monkeypatch.setattr(held_stat, "MOUNTINFO", str(tmp_path / "no-mount-table"))
    with pytest.raises(SystemExit, match="not on a local filesystem"):
        check_stat.main(["--input", str(tmp_path), "--files", "1", "--batch", "1"])
