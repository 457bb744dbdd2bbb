"""The GPU decode path without a GPU: the header pre-screen, the real DALI graph on the CPU
(``--decode dali_cpu``, the same graph ``--decode gpu`` runs with the mixed backend), batch fallback,
the scorer, and the contract inputs = predictions + dead letters on the mixed good/broken corpus.
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from engines.base import EngineError
from tests.conftest import jpeg_bytes, photo
from images.pillow_decoder import PreprocessConfig, preprocess_image
from images.prescreen import CPU, GPU, exif_orientation, screen

dali = pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")

LIMIT = PreprocessConfig().max_pixels


def _png(mode, size=(64, 48), **save):
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG", **save)
    return buf.getvalue()


def _jpeg_with_orientation(orientation: int) -> bytes:
    image = Image.fromarray(photo("coffee"))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_prescreen_sends_only_sound_dali_safe_images_to_the_gpu():
    good = jpeg_bytes(photo("chelsea"))
    assert screen(good, LIMIT) == (GPU, "jpeg", 451, 300, "")
    assert screen(_png("RGB"), LIMIT).route == GPU
    assert screen(_png("L"), LIMIT).route == GPU
    cpu_cases = {
        "truncated": good[: len(good) // 2],
        "cmyk": _cmyk(),
        "rgba png": _png("RGBA"),
        "palette png": _png("P"),
        "transparent rgb png": _png("RGB", transparency=(0, 0, 0)),
        "interlaced": _png("RGB", interlace=1) if False else _interlaced_png(),
        "bomb": _png("1", (10_000, 10_000)),
        "gif": _gif(),
        "empty": b"",
        "text": b"not an image at all",
        "cut header": good[:40],
    }
    for name, data in cpu_cases.items():
        assert screen(data, LIMIT).route == CPU, name
    assert screen(good, 451 * 300 - 1).route == CPU  # over --max_pixels: Pillow gives the reason


def _cmyk():
    buf = io.BytesIO()
    Image.fromarray(photo("chelsea")).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def _gif():
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, "GIF")
    return buf.getvalue()


def _interlaced_png():
    # Pillow cannot write Adam7; flip the IHDR interlace byte (the CRC is not checked by the screen).
    data = bytearray(_png("RGB"))
    data[28] = 1
    return bytes(data)


def test_exif_orientation_is_read_and_transposed_sizes_swap():
    for orientation in (1, 3, 6, 8):
        data = _jpeg_with_orientation(orientation)
        start = data.index(b"Exif\x00\x00")
        assert exif_orientation(data[start:start + 200]) == orientation
        result = screen(data, LIMIT)
        assert result.route == GPU
        assert (result.width, result.height) == ((400, 600) if orientation >= 5 else (600, 400))


def decode_input(datas, config=PreprocessConfig()):
    """A DecodeInput with each file's crop box (for ``config``) from its header, as the reader makes it."""
    from images.dali_decoder import DecodeInput
    from images.pillow_decoder import crop_box

    boxes = []
    for data in datas:
        s = screen(bytes(data), LIMIT)
        boxes.append(crop_box(s.width, s.height, config) if s.width else (0.0, 0.0, 16.0, 16.0))
    return DecodeInput([np.frombuffer(bytes(d), np.uint8) for d in datas], boxes)


@pytest.fixture(scope="module")
def decoder():
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    d = DaliDecoder(DaliDecoderOptions(device="cpu", max_batch=8, threads=2))
    yield d
    d.close()


@pytest.mark.parametrize("where", ["host", "graph"])
def test_dali_graph_matches_the_cpu_definition_of_resize_and_crop(decoder, where):
    # The crop box comes from the header (on the host, or inside the graph); DALI's own
    # resize_shorter + crop was one pixel off and gave a mean difference of 6.6 on chelsea
    # (451x300), exact boxes give ~0.2.
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    images = {"chelsea": jpeg_bytes(photo("chelsea")), "coffee": jpeg_bytes(photo("coffee")),
              "rotated": _jpeg_with_orientation(6), "portrait": jpeg_bytes(photo("astronaut")[:, 100:400])}
    use = decoder if where == "host" else DaliDecoder(DaliDecoderOptions(device="cpu", max_batch=8, threads=2,
                                                                          crop_box="graph"))
    batch = next(use.decode([decode_input(list(images.values()))]))
    assert batch.failed == {} and batch.images.shape == (4, 224, 224, 3) and batch.images.dtype == np.uint8
    for (name, data), image in zip(images.items(), batch.images):
        diff = np.abs(image.astype(int) - preprocess_image(data).astype(int)).mean()
        assert diff < 1.0, (name, diff)


@pytest.mark.parametrize("shape", [(240, 320), (320, 240)], ids=["wide", "tall"])
@pytest.mark.parametrize("where", ["host", "graph"])
def test_dali_graph_crops_height_by_width_as_pillow_does(where, shape):
    # A model taking 240 x 320 (height x width), or 320 x 240: both axes of the crop box and of the
    # output follow the options, for a landscape photo, a portrait one and an EXIF-rotated one.
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    height, width = shape
    config = PreprocessConfig(resize=320, crop=height, crop_width=width)
    options = DaliDecoderOptions(resize=320, crop=height, crop_width=width, device="cpu", max_batch=8, threads=2,
                                 crop_box=where)
    assert options.crop_size == shape
    images = {"landscape": jpeg_bytes(photo("chelsea")), "portrait": jpeg_bytes(photo("astronaut")[:, 100:400]),
              "rotated": _jpeg_with_orientation(6)}
    d = DaliDecoder(options)
    try:
        batch = next(d.decode([decode_input(list(images.values()), config)]))
        assert batch.failed == {} and batch.images.shape == (3, height, width, 3) and batch.images.dtype == np.uint8
        for (name, data), image in zip(images.items(), batch.images):
            diff = np.abs(image.astype(int) - preprocess_image(data, config).astype(int)).mean()
            assert diff < 1.0, (name, diff)  # as for the square crop above
        # A batch with no decodable image still has the crop's shape, with no rows.
        (empty,) = d.decode([decode_input([b"\xff\xd8\xff this is no JPEG"], config)])
        assert empty.images.shape == (0, height, width, 3) and list(empty.failed) == [0]
    finally:
        d.close()


def test_dali_options_check_the_crop_fits_the_resize():
    from images.dali_decoder import DaliDecoderOptions

    assert DaliDecoderOptions().crop_size == (224, 224)
    with pytest.raises(EngineError, match=r"got crop=240 crop_width=320 resize=256"):
        DaliDecoderOptions(resize=256, crop=240, crop_width=320)
    with pytest.raises(EngineError, match=r"crop_width=0"):
        DaliDecoderOptions(crop_width=0)
    with pytest.raises(EngineError, match=r"need 0 < crop <= resize, got crop=300 resize=256"):
        DaliDecoderOptions(crop=300)


def test_running_out_of_gpu_memory_fails_the_batch_with_the_fix_instead_of_retrying_each_image(decoder, monkeypatch):
    """Seen on two H100s: eight processes filled one GPU, and a decoder rebuilt itself 1,400 times
    retrying image by image. Out of memory is no bad image: the batch fails once, naming the fix."""
    good = [jpeg_bytes(photo(n)) for n in ("chelsea", "coffee")]
    real_take = decoder._take
    calls = []

    def take_out_of_memory():
        calls.append(1)
        raise RuntimeError("Critical error in pipeline:\nnvjpeg error #5 (allocator failure) when running "
                           "nvjpegDecoderStateCreate")

    monkeypatch.setattr(decoder, "_take", take_out_of_memory)
    before = decoder.rebuilds
    with pytest.raises(EngineError, match=r"ran out of memory .*allocator failure.*fewer SDK processes per GPU"):
        list(decoder.decode([decode_input(good)]))
    assert calls == [1] and decoder.rebuilds == before  # no image-by-image retries
    monkeypatch.setattr(decoder, "_take", real_take)
    batch = next(decoder.decode([decode_input(good)]))  # the next batch gets a fresh pipeline
    assert batch.failed == {} and batch.images.shape[0] == 2 and decoder.rebuilds == before + 1


def test_a_failed_batch_is_retried_image_by_image(decoder):
    good = [jpeg_bytes(photo(n)) for n in ("chelsea", "coffee")]
    bad = b"\xff\xd8\xff this is no JPEG"
    before = decoder.rebuilds
    results = list(decoder.decode([decode_input(good), decode_input([good[0], bad, good[1]]), decode_input(good)]))
    assert [r.failed for r in results[::2]] == [{}, {}]
    assert list(results[1].failed) == [1] and "decoder failed on this image" in results[1].failed[1]
    assert results[1].index == [0, 2] and results[1].images.shape[0] == 2
    for image, data in zip(results[1].images, good):  # image by image, each keeps its own pixels
        assert np.abs(image.astype(int) - preprocess_image(data).astype(int)).mean() < 1.0
    assert decoder.rebuilds > before
    with pytest.raises(EngineError, match="1..8 images"):
        list(decoder.decode([decode_input(good * 5)]))
    with pytest.raises(EngineError, match="one crop box per image"):
        list(decoder.decode([[np.frombuffer(good[0], np.uint8)]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_crop_box_that_is_not_finite_is_refused_before_dali_sees_it(decoder, bad):
    # DALI's CPU backend waited forever on a NaN crop window (found in review): such a box is refused before the
    # feed, naming the fix.
    from engines.base import EngineError

    batch = decode_input([jpeg_bytes(photo("chelsea"))])
    with pytest.raises(EngineError, match="finite"):
        decoder._source_item(batch._replace(boxes=[(0.0, bad, 10.0, 10.0)]), 0)
    # In a batch it fails its own image; the others decode.
    batch = decode_input([jpeg_bytes(photo(n)) for n in ("chelsea", "coffee", "astronaut")])
    boxes = list(batch.boxes)
    boxes[1] = (0.0, bad, 10.0, 10.0)
    (result,) = list(decoder.decode([batch._replace(boxes=boxes)]))
    assert result.index == [0, 2] and list(result.failed) == [1] and "finite" in result.failed[1]


def test_two_callers_interleaved_on_one_decoder_get_an_error_not_each_others_images():
    """What a decoder shared without a lock did: a second caller took the batch the first had queued
    and scored it as its own. Each batch's ids travel through the graph beside its images, so the
    take sees whose batch it got and refuses it, naming both."""
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    chelsea, coffee, astronaut = (jpeg_bytes(photo(n)) for n in ("chelsea", "coffee", "astronaut"))
    d = DaliDecoder(DaliDecoderOptions(device="cpu", max_batch=8, threads=1, prefetch=2))
    try:
        first = d.decode([decode_input([chelsea]), decode_input([coffee])])
        batch = next(first)  # both of its batches are queued now (prefetch 2)
        assert np.abs(batch.images[0].astype(int) - preprocess_image(chelsea).astype(int)).mean() < 1.0
        with pytest.raises(EngineError, match=r"returned the images of batch 1 \(1 image\) where batch 2 "
                                              r"\(1 image\) was expected"):
            next(d.decode([decode_input([astronaut])]))  # its take would be coffee's queued batch
        first.close()
        # The decoder drops the mixed-up pipeline: its next use decodes what it is given.
        (again,) = d.decode([decode_input([astronaut])])
        assert again.index == [0] and again.failed == {}
        assert np.abs(again.images[0].astype(int) - preprocess_image(astronaut).astype(int)).mean() < 1.0
    finally:
        d.close()


def test_scorer_orders_rows_pixels_first_and_decodes_on_cpu_without_a_decoder(model_path):
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from images.scoring import ImageScorer

    chelsea, coffee = jpeg_bytes(photo("chelsea")), jpeg_bytes(photo("coffee"))
    pixels = preprocess_image(coffee)[None]
    engine = OnnxRuntimeLoader(model_path)()
    scorer = ImageScorer(engine, None, preprocess_image)
    (result,) = scorer.score([(pixels, (chelsea, b"garbage"), None)], ["logits"])
    assert list(result.outputs) == ["logits"] and result.outputs["logits"].shape == (2, 1000)
    assert set(result.failed) == {2} and "not an image" in result.failed[2]
    direct = engine.infer({"images": np.stack([preprocess_image(coffee), preprocess_image(chelsea)])})["logits"]
    np.testing.assert_allclose(result.outputs["logits"], direct, atol=1e-4)
    with pytest.raises(EngineError, match="without a decoder"):
        ImageScorer(engine).score([(None, (chelsea,), None)])


def test_onnxruntime_on_the_cpu_refuses_device_arrays_with_the_fix(model_path):
    from engines.onnxruntime_engine import OnnxRuntimeLoader

    class FakeDeviceArray:  # only the interface matters: the engine must refuse before reading it
        __cuda_array_interface__ = {"shape": (1, 224, 224, 3), "typestr": "|u1", "data": (1, False),
                                    "version": 3, "strides": None}

    engine = OnnxRuntimeLoader(model_path)()
    with pytest.raises(EngineError, match="--providers cuda"):
        engine.infer({"images": FakeDeviceArray()})


def _rows(directory):
    rows, dead = {}, {}
    from pipelines.partitions import committed_files

    for path in committed_files(directory, "predictions"):
        for line in open(path):
            row = json.loads(line)
            rows[row["uri"]] = row["top_k"][0]["class_id"]
    for path in committed_files(directory, "dead_letter"):
        for line in open(path):
            row = json.loads(line)
            dead[row["uri"]] = (row["stage"], row["error"])
    return rows, dead


def test_dali_cpu_gives_the_same_dead_letters_and_top1_as_cpu_on_the_demo_images(tmp_path, model_path):
    from pipelines.classify_images import run
    from pipelines.demo import write_broken, write_photos

    images = tmp_path / "demo"
    images.mkdir()
    photos, broken = write_photos(str(images)), write_broken(str(images))
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(photos + broken) + "\n")
    outputs = {}
    for mode in ("dali_cpu", "cpu"):
        stats = run(["--input", str(manifest), "--output", str(tmp_path / mode), "--decode", mode,
                     "--batch_size", "4", "--progress_every_s", "0"])
        assert stats["inputs"] == len(photos) + len(broken) == stats["predictions"] + stats["dead_letters"]
        assert stats["unaccounted"] == 0 and stats["settings"]["decode"] == mode
        outputs[mode] = _rows(str(tmp_path / mode))
    (dali_rows, dali_dead), (cpu_rows, cpu_dead) = outputs["dali_cpu"], outputs["cpu"]
    assert dali_dead == cpu_dead and len(cpu_dead) == len(broken)
    assert set(dali_rows) == set(cpu_rows) == set(photos)
    assert all(dali_rows[u] == cpu_rows[u] for u in photos)


def test_decode_gpu_without_a_gpu_engine_or_device_stops_at_start_naming_the_flag(tmp_path, corpus):
    from pipelines.classify_images import main

    directory, _, _ = corpus
    assert main(["--input", directory, "--output", str(tmp_path / "a"), "--decode", "gpu"]) == 2
    assert main(["--input", directory, "--output", str(tmp_path / "b"), "--decode", "gpu",
                 "--providers", "cuda"]) == 2


def test_decode_auto_on_a_cpu_machine_decodes_with_pillow_and_says_why(tmp_path, corpus, model_path):
    from pipelines.classify_images import run

    directory, good, broken = corpus
    stats = run(["--input", directory, "--output", str(tmp_path / "o"), "--progress_every_s", "0"])
    assert stats["settings"]["decode"] == "cpu" and "engine runs on the CPU" in stats["settings"]["decode_choice"]
    assert stats["predictions"] == len(good) and stats["unaccounted"] == 0


def test_a_decoder_told_zero_threads_builds_with_the_cores_of_the_machine_it_is_built_on(monkeypatch):
    """A job whose workers run elsewhere leaves DALI's threads to the worker (``--dali_threads -1`` becomes 0 at
    launch): the launcher's cores say nothing of the worker's."""
    import os

    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    options = DaliDecoderOptions(device="cpu", max_batch=4, threads=0)
    assert options.threads_here == 3
    decoder = DaliDecoder(options)
    try:
        assert decoder._pipe.num_threads == 3
    finally:
        decoder.close()
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert options.threads_here == 16 and DaliDecoderOptions(threads=5).threads_here == 5
    with pytest.raises(EngineError):
        DaliDecoderOptions(threads=-1)
