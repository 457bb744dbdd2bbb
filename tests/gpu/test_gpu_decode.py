"""GPU decode and device-resident inputs, for real on a GPU.

NVIDIA DALI's mixed backend decodes on the GPU, and ONNX Runtime's CUDA provider reads the
decoded batch where it is (IOBinding). Needs a CUDA GPU, nvidia-dali and onnxruntime-gpu.

    python -m pytest -m cuda tests/gpu/test_gpu_decode.py -v
"""

import os

import numpy as np
import pytest

from images.dali_decoder import DaliDecoder, DaliDecoderOptions, DecodeInput, gpu_decode_unavailable
from images.pillow_decoder import PreprocessConfig, crop_box
from images.prescreen import screen


def decode_input(datas):
    """A DecodeInput with each file's crop box from its header, as the reader makes it."""
    boxes = []
    for data in datas:
        s = screen(bytes(data), PreprocessConfig().max_pixels)
        boxes.append(crop_box(s.width, s.height, PreprocessConfig()) if s.width else (0.0, 0.0, 16.0, 16.0))
    return DecodeInput([np.frombuffer(bytes(d), np.uint8) for d in datas], boxes)


def _ready():
    missing = gpu_decode_unavailable()
    if missing:
        return f"needs a CUDA GPU and NVIDIA DALI: {missing}"
    try:
        import onnxruntime
    except ImportError as e:
        return f"needs onnxruntime-gpu: {e}"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "needs onnxruntime-gpu (no CUDAExecutionProvider)"
    return None


REASON = _ready()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from pipelines.demo import write_broken, write_photos

    directory = tmp_path_factory.mktemp("demo")
    photos = write_photos(str(directory))
    broken = write_broken(str(directory))
    return photos, broken


@pytest.fixture(scope="module")
def decoder():
    d = DaliDecoder(DaliDecoderOptions(max_batch=16, device="gpu"))
    yield d
    d.close()


def test_gpu_decoder_matches_pillow_on_what_the_prescreen_sends_it(demo, decoder):
    from images.pillow_decoder import preprocess_image
    from images.prescreen import GPU, screen

    photos, _ = demo
    chosen = [p for p in photos if screen(open(p, "rb").read(), 89478485).route == GPU]
    assert len(chosen) >= 5
    batch = next(decoder.decode([decode_input([open(p, "rb").read() for p in chosen])]))
    assert hasattr(batch.images, "__cuda_array_interface__")  # it stayed on the GPU
    images = np.array(batch.images.as_cpu())
    for path, image in zip(chosen, images):
        diff = np.abs(image.astype(int) - preprocess_image(open(path, "rb").read()).astype(int)).mean()
        assert diff < 2.0, (os.path.basename(path), diff)


def test_a_batch_with_a_bad_file_fails_only_that_file(demo, decoder):
    photos, _ = demo
    jpegs = [open(p, "rb").read() for p in photos if p.endswith(".jpg")][:3]
    bad = b"\xff\xd8\xff garbage that is no JPEG"
    results = list(decoder.decode([decode_input(jpegs), decode_input(jpegs[:1] + [bad] + jpegs[1:]),
                                   decode_input(jpegs)]))
    assert [r.failed for r in results][0] == {}
    assert list(results[1].failed) == [1] and "DALI gpu decoder failed" in results[1].failed[1]
    assert results[1].index == [0, 2, 3]
    assert decoder.rebuilds >= 1
    assert results[2].failed == {} and len(results[2].index) == 3


def test_onnxruntime_reads_the_decoded_batch_on_the_gpu(demo, decoder, model_path):
    from engines.onnxruntime_engine import OnnxRuntimeLoader

    photos, _ = demo
    jpegs = [open(p, "rb").read() for p in photos if p.endswith(".jpg")]
    engine = OnnxRuntimeLoader(model_path, ("cuda",))()
    stream = decoder.decode([decode_input(jpegs)])
    batch = next(stream)
    on_device = engine.infer({"images": batch.images}, ["logits"])
    on_host = engine.infer({"images": np.array(batch.images.as_cpu())}, ["logits"])
    list(stream)
    assert list(on_device) == ["logits"]
    np.testing.assert_allclose(on_device["logits"], on_host["logits"], atol=1e-3, rtol=1e-3)
    engine.close()


def _rows(directory):
    from pipelines.partitions import committed_rows

    rows = {row["uri"]: row["top_k"][0]["class_id"] for row in committed_rows(directory, "predictions")}
    dead = {row["uri"]: (row["stage"], row["error"]) for row in committed_rows(directory, "dead_letter")}
    return rows, dead


def _gpu_and_cpu_agree(demo, tmp_path, *flags):
    """Runs the demo inputs with --decode gpu and --decode cpu (ONNX Runtime CUDA): the same dead letters,
    every photo scored, and top-1 agreement (returned) of at least 90%."""
    from pipelines.classify_images import run

    photos, broken = demo
    manifest = tmp_path / "inputs.txt"
    manifest.write_text("\n".join(photos + broken) + "\n")
    outputs = {}
    for mode in ("gpu", "cpu"):
        stats = run(["--input", str(manifest), "--output", str(tmp_path / mode), "--providers", "cuda",
                     "--decode", mode, "--batch_size", "8", "--progress_every_s", "0", *flags])
        assert stats["inputs"] == len(photos) + len(broken) == stats["predictions"] + stats["dead_letters"]
        assert stats["unaccounted"] == 0
        outputs[mode] = stats, _rows(str(tmp_path / mode))
    (_, (gpu_rows, gpu_dead)), (_, (cpu_rows, cpu_dead)) = outputs["gpu"], outputs["cpu"]
    assert gpu_dead == cpu_dead
    assert set(gpu_rows) == set(cpu_rows) == set(photos)
    agree = sum(gpu_rows[u] == cpu_rows[u] for u in photos) / len(photos)
    assert agree >= 0.9, agree
    return agree, outputs["gpu"][0]


def test_decode_gpu_gives_the_same_dead_letters_and_top1_as_decode_cpu(demo, tmp_path, model_path):
    _gpu_and_cpu_agree(demo, tmp_path)


def test_decode_gpu_with_a_float_model_gives_the_rows_of_decode_cpu(demo, tmp_path):
    """A float32 NCHW export with --mean/--std: the conversion prepended at load runs on the GPU beside DALI's
    crops, device-resident, and the rows are those the CPU path (Pillow, conversion on the CPU) gives."""
    from tests.model_variants import FLOAT_MODEL

    if not FLOAT_MODEL.exists():
        pytest.fail(f"{FLOAT_MODEL} is missing: run `make test-gpu` (it exports it)")
    agree, stats = _gpu_and_cpu_agree(demo, tmp_path, "--model", str(FLOAT_MODEL), "--mean", "0.485,0.456,0.406",
                                      "--std", "0.229,0.224,0.225")
    assert stats["settings"]["model"]["preprocessing"]["in_graph"]
    print(f"float model, --decode gpu vs cpu: top-1 agreement {agree:.0%} over the demo photos")


def test_the_gpu_decoder_crops_height_x_width_as_pillow_does(demo):
    """The mixed backend (nvJPEG) crops a 240 x 320 box as Pillow does, on what the pre-screen sends it."""
    from images.pillow_decoder import preprocess_image
    from images.prescreen import GPU

    config = PreprocessConfig(resize=366, crop=240, crop_width=320)
    photos, _ = demo
    datas = [open(p, "rb").read() for p in photos]
    datas = [d for d in datas if screen(d, config.max_pixels).route == GPU]
    assert len(datas) >= 5
    boxes = [crop_box(s.width, s.height, config) for s in (screen(d, config.max_pixels) for d in datas)]
    gpu = DaliDecoder(DaliDecoderOptions(resize=366, crop=240, crop_width=320, max_batch=16, device="gpu"))
    try:
        stream = gpu.decode([DecodeInput([np.frombuffer(d, np.uint8) for d in datas], boxes)])
        batch = next(stream)
        images = np.array(batch.images.as_cpu())
        list(stream)
    finally:
        gpu.close()
    assert images.shape == (len(datas), 240, 320, 3)
    for data, got in zip(datas, images):
        assert np.abs(got.astype(int) - preprocess_image(data, config).astype(int)).mean() < 2.0


def _to_host(images) -> np.ndarray:
    from engines.cuda import Stream, copy_d2h_async

    cai = images.__cuda_array_interface__
    out = np.empty(cai["shape"], np.uint8)
    stream = Stream()
    copy_d2h_async(out.ctypes.data, cai["data"][0], out.nbytes, stream)
    stream.synchronize()
    stream.destroy()
    return out


def test_the_decoder_service_hands_each_caller_a_copy_of_its_own_on_the_gpu(demo, decoder, model_path):
    """The service copies each decoded batch out of DALI's output into a buffer the caller owns: the same
    bytes as the decoder's own output, still there after the decoder has gone on to other batches, read
    by ONNX Runtime in place, and the buffer reused once released."""
    from engines.base import EngineError
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from images.decoder_service import DecoderService

    photos, _ = demo
    jpegs = [open(p, "rb").read() for p in photos if p.endswith(".jpg")]
    batches = [decode_input(jpegs), decode_input(jpegs[::-1]), decode_input(jpegs[:3])]
    want = [np.array(b.images.as_cpu()) for b in decoder.decode(batches)]
    service = DecoderService(DaliDecoderOptions(max_batch=16, device="gpu"))
    engine = OnnxRuntimeLoader(model_path, ("cuda",))()
    try:
        held = list(service.decode(batches, ahead=3))  # all three held at once: three buffers
        assert service.buffers == 3
        for got, expected in zip(held, want):
            assert _to_host(got.images).shape == expected.shape and (_to_host(got.images) == expected).all()
        logits = engine.infer({"images": held[0].images}, ["logits"])["logits"]
        np.testing.assert_allclose(logits, engine.infer({"images": want[0]}, ["logits"])["logits"], atol=1e-3)
        for got in held:
            got.images.release()
        with pytest.raises(EngineError, match="used after it was released"):
            held[0].images.__cuda_array_interface__
        again = list(service.decode(batches))
        assert service.buffers == 3  # released buffers were reused
        assert all((_to_host(g.images) == w).all() for g, w in zip(again, want))
    finally:
        engine.close()
        service.close()


def test_a_copy_that_does_not_fit_the_gpus_free_memory_is_refused_at_load(tmp_path, monkeypatch, model_path):
    """The first copy warms up under the check and records what the GPU's free memory fell by; with less
    than that left free (a buffer holds the rest), the next identical copy stops at load, naming the fix."""
    import json

    from engines.base import EngineError
    from engines.gpu_memory import free_memory, loader_key
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from engines.cuda import DeviceBuffer
    from transforms.inference import ScorerLoader

    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))  # a ledger of this test's own
    loader = ScorerLoader(OnnxRuntimeLoader(model_path, ("cuda",)), DaliDecoderOptions(max_batch=64, device="gpu"),
                          PreprocessConfig(), warmup_images=64)
    scorer = loader()
    hog = None
    try:
        took = json.loads((tmp_path / "engines-gpu0-memory.json").read_text())[loader_key(loader)]["bytes"]
        assert took > 100 << 20, took  # ONNX Runtime's activations at batch 64 and DALI's buffers
        free, _ = free_memory(0)
        hog = DeviceBuffer(free - took // 2)
        with pytest.raises(EngineError, match=r"GPU 0 has .* free .* this copy does not fit; run fewer engine copies"):
            loader()
    finally:
        if hog is not None:
            hog.free()
        scorer.close()
