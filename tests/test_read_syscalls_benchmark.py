"""The read benchmark runs both reads on real files and reports a ratio for each load it was asked for."""


def test_the_read_benchmark_times_both_reads_alone_and_beside_busy_threads(tmp_path, capsys):
    from benchmarks import read_syscalls

    for i in range(20):
        (tmp_path / f"{i:02d}.jpg").write_bytes(bytes([i]) * (100 + i))
    results = read_syscalls.main(["--input", str(tmp_path), "--files", "10", "--busy", "1", "--rounds", "2"])
    assert sorted(results) == [0, 1]
    for busy in (0, 1):
        assert [len(v) for v in results[busy]["seconds_per_file"].values()] == [2, 2]
        assert results[busy]["ratio_open_read_vs_ours"] > 0
    assert "beside 1 busy threads, 10 files" in capsys.readouterr().out


def test_with_a_switch_interval_ours_is_timed_with_it_too_and_the_interval_is_put_back(tmp_path, capsys):
    import sys

    from benchmarks import read_syscalls

    for i in range(10):
        (tmp_path / f"{i:02d}.jpg").write_bytes(bytes([i]) * 200)
    before = sys.getswitchinterval()
    results = read_syscalls.main(["--input", str(tmp_path), "--files", "10", "--busy", "1", "--rounds", "1",
                                  "--switch_interval_ms", "0.5"])
    assert sys.getswitchinterval() == before
    assert sorted(results[1]["seconds_per_file"]) == ["open_read", "ours", "ours_switched"]
    assert results[1]["ratio_ours_vs_switched"] > 0
    progress = results[1]["busy_iterations_per_second"]
    assert sorted(progress) == ["open_read", "ours", "ours_switched"] and all(len(v) == 1 and v[0] >= 0
                                                                               for v in progress.values())
    assert "with a 0.5 ms switch interval ours" in capsys.readouterr().out
