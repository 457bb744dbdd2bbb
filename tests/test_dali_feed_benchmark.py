"""The feed benchmark builds both feeds from real JPEGs, checks they hold the same samples, and times each."""

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
    assert result["ratio_per_sample_vs_ours"] > 0
    assert "3 images a batch, beside 1 busy threads" in capsys.readouterr().out


def test_the_decoders_inputs_hold_one_row_per_image_as_the_per_sample_lists_did():
    import numpy as np

    from benchmarks.dali_feed import per_sample
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions, DecodeInput

    decoder = DaliDecoder(DaliDecoderOptions(device="cpu", max_batch=4, threads=1))
    try:
        files = [np.frombuffer(jpeg_bytes(photo(name)), np.uint8) for name in ("chelsea", "coffee", "astronaut")]
        batch = DecodeInput(files, [(1.5, 2.0, 101.0, 90.25), (0.0, 3.0, 50.0, 60.0), (7.0, 0.0, 300.0, 200.0)])
        encoded, starts, ends, ids = decoder._source_item(batch, 41)
        assert starts.tolist() == [[2.0, 1.5], [3.0, 0.0], [0.0, 7.0]]  # (y, x): DALI's order
        assert ends.tolist() == [[90.25, 101.0], [60.0, 50.0], [200.0, 300.0]]
        assert ids.tolist() == [[41, 0], [41, 1], [41, 2]] and ids.dtype == np.int64 and starts.dtype == np.float32
        for before, now in zip(per_sample(batch, 41), (encoded, starts, ends, ids)):
            assert len(before) == len(now) and all(np.array_equal(a, b) for a, b in zip(before, now))
        # And DALI takes them: a batch decodes whole, its ids checked at the take.
        decoded = next(decoder.decode([batch]))
        assert decoded.failed == {} and decoded.images.shape[0] == 3
    finally:
        decoder.close()


def test_crop_boxes_of_another_shape_than_four_numbers_an_image_are_refused_not_reshaped():
    import numpy as np

    from engines.base import EngineError
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions, DecodeInput

    decoder = DaliDecoder(DaliDecoderOptions(device="cpu", max_batch=4, threads=1))
    try:
        files = [np.frombuffer(jpeg_bytes(photo("coffee")), np.uint8)] * 2
        for boxes in ([((1.0, 2.0), (3.0, 4.0))] * 2, np.zeros((2, 1, 4)), [(1.0, 2.0, 3.0)] * 2,
                      [(1.0, 2.0, 3.0, 4.0), (1.0, 2.0, 3.0)], [("a", 1, 2, 3)] * 2):
            with pytest.raises(EngineError, match="one crop box"):
                decoder._source_item(DecodeInput(files, boxes), 0)
    finally:
        decoder.close()
