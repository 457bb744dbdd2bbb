"""The DALI file-read benchmark decodes real JPEGs both ways with DALI's CPU decoder and reports each load."""

import pytest

from tests.conftest import noise_jpegs

pytest.importorskip("nvidia.dali")


def test_both_ways_decode_the_same_pixels_and_are_timed_alone_and_beside_busy_threads(tmp_path, capsys):
    from benchmarks import dali_file_read

    noise_jpegs(tmp_path, 9)  # two whole batches of 4; the ninth file is left out
    results = dali_file_read.main(["--input", str(tmp_path), "--files", "9", "--batch", "4", "--busy", "1",
                                   "--rounds", "2"])
    assert sorted(results) == [0, 1]
    for busy in (0, 1):
        rates = results[busy]["images_per_second"]
        assert sorted(rates) == ["dali_reads", "python_reads"] and all(len(v) == 2 for v in rates.values())
        assert results[busy]["ratio_dali_vs_python"] > 0
    assert "beside 1 busy threads, 8 images in batches of 4" in capsys.readouterr().out


def test_fewer_files_than_a_batch_is_refused_with_the_fix(tmp_path):
    from benchmarks import dali_file_read

    noise_jpegs(tmp_path, 3)
    with pytest.raises(SystemExit, match="fewer than one batch of 4: give more files or a smaller --batch"):
        dali_file_read.main(["--input", str(tmp_path), "--batch", "4"])


def test_a_way_that_decodes_other_pixels_stops_the_benchmark(tmp_path, monkeypatch):
    from benchmarks import dali_file_read

    noise_jpegs(tmp_path, 4)
    first = str(tmp_path / "00.jpg")
    swapped = (tmp_path / "01.jpg").read_bytes()
    real = dali_file_read.python_read
    monkeypatch.setattr(dali_file_read, "python_read", lambda p: swapped if p == first else real(p))
    with pytest.raises(SystemExit, match="the two ways decode .*00.jpg differently"):
        dali_file_read.main(["--input", str(tmp_path), "--batch", "4", "--rounds", "1"])
