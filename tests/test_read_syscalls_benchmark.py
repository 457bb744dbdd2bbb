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
