"""The read-together benchmark times the GPU path's reader three ways on real JPEGs, after checking each way gives
every file the same outcome."""

import pytest

from tests.conftest import noise_jpegs

pytest.importorskip("nvidia.dali")


def test_three_ways_give_the_same_outcomes_and_are_timed_alone_and_beside_busy_threads(tmp_path, capsys):
    from benchmarks import read_together

    noise_jpegs(tmp_path, 9)  # two whole batches of 4; the ninth file is left out
    results = read_together.main(["--input", str(tmp_path), "--files", "9", "--batch", "4", "--busy", "1",
                                  "--rounds", "2"])
    assert sorted(results) == [0, 1]
    for busy in (0, 1):
        rates = results[busy]["images_per_second"]
        assert sorted(rates) == ["alone", "together", "together_stat"] and all(len(v) == 2 for v in rates.values())
        assert sorted(results[busy]["ratios_vs_alone"]) == ["together", "together_stat"]
    assert "beside 1 busy threads, 8 files in batches of 4" in capsys.readouterr().out


def test_a_way_that_gives_another_outcome_stops_the_benchmark(tmp_path, monkeypatch):
    from benchmarks import read_together

    noise_jpegs(tmp_path, 4)
    (tmp_path / "01.jpg").write_bytes(b"not a JPEG")
    real = read_together._ways

    def ways(config):
        found = real(config)
        together = found["together"]
        found["together"] = lambda paths, sizes: list(reversed(together(paths, sizes)))  # outcomes swapped
        return found

    monkeypatch.setattr(read_together, "_ways", ways)
    with pytest.raises(SystemExit, match="together gives .* another outcome than reading it alone"):
        read_together.main(["--input", str(tmp_path), "--batch", "4", "--rounds", "1"])


def test_fewer_files_than_a_batch_is_refused_with_the_fix(tmp_path):
    from benchmarks import read_together

    noise_jpegs(tmp_path, 3)
    with pytest.raises(SystemExit, match="fewer than one batch of 4: give more files or a smaller --batch"):
        read_together.main(["--input", str(tmp_path), "--batch", "4"])
