"""The feed benchmark builds the decoder's feed and the array candidate from real JPEGs, checks they hold the same
samples, and times each; the candidate refuses boxes the decoder would refuse."""

import pytest

from tests.conftest import jpeg_bytes, photo

pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")


def test_the_feed_benchmark_times_both_feeds_of_the_same_samples(tmp_path, capsys):
    from benchmarks import dali_feed

    for i, name in enumerate(("chelsea", "coffee", "astronaut")):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(photo(name)))
    result = dali_feed.main(["--input", str(tmp_path), "--images", "3", "--busy", "1", "--rounds", "2",
                             "--repeat", "3"])
    assert result["images"] == 3 and result["busy"] == 1
    assert [len(v) for v in result["seconds_per_batch"].values()] == [2, 2]
    assert result["ratio_per_sample_vs_arrays"] > 0
    assert "3 images a batch, beside 1 busy threads" in capsys.readouterr().out


def test_the_array_candidate_holds_one_row_per_image_as_the_decoders_lists_do():
    import numpy as np

    from benchmarks.dali_feed import arrays
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions, DecodeInput

    decoder = DaliDecoder(DaliDecoderOptions(device="cpu", max_batch=4, threads=1))
    try:
        files = [np.frombuffer(jpeg_bytes(photo(name)), np.uint8) for name in ("chelsea", "coffee", "astronaut")]
        batch = DecodeInput(files, [(1.5, 2.0, 101.0, 90.25), (0.0, 3.0, 50.0, 60.0), (7.0, 0.0, 300.0, 200.0)])
        encoded, starts, ends, ids = arrays(batch, 41)
        assert starts.tolist() == [[2.0, 1.5], [3.0, 0.0], [0.0, 7.0]]  # (y, x): DALI's order
        assert ends.tolist() == [[90.25, 101.0], [60.0, 50.0], [200.0, 300.0]]
        assert ids.tolist() == [[41, 0], [41, 1], [41, 2]] and ids.dtype == np.int64 and starts.dtype == np.float32
        for fed, candidate in zip(decoder._source_item(batch, 41), (encoded, starts, ends, ids)):
            assert len(fed) == len(candidate) and all(np.array_equal(a, b) for a, b in zip(fed, candidate))
    finally:
        decoder.close()


def test_the_array_candidate_refuses_boxes_that_are_not_four_numbers_an_image():
    import numpy as np

    from benchmarks.dali_feed import arrays
    from engines.base import EngineError
    from images.dali_decoder import DecodeInput

    files = [np.frombuffer(jpeg_bytes(photo("coffee")), np.uint8)] * 2
    for boxes in (None, [(1.0, 2.0, 3.0, 4.0)], [((1.0, 2.0), (3.0, 4.0))] * 2, np.zeros((2, 1, 4)),
                  [(1.0, 2.0, 3.0)] * 2, [(1.0, 2.0, 3.0, 4.0), (1.0, 2.0, 3.0)], [("a", 1, 2, 3)] * 2):
        with pytest.raises(EngineError, match="one crop box per image"):
            arrays(DecodeInput(files, boxes), 0)
