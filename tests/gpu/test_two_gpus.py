"""Engine copies and their decoders on two GPUs, for real. Needs two CUDA GPUs, NVIDIA
DALI, onnxruntime-gpu and CuPy; skipped otherwise.

    python -m pytest -m cuda tests/gpu/test_two_gpus.py -v

The whole job on two GPUs (one engine and one decoder per GPU, both busy, every input accounted
for once) is measured by ``python -m benchmarks.throughput --device gpu --runs engine,gpus``.
"""

import os

import numpy as np
import pytest

from engines.devices import cuda_device_count
from tests.gpu.test_gpu_decode import REASON, decode_input

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(REASON is not None, reason=REASON or ""),
              pytest.mark.skipif(REASON is None and cuda_device_count() < 2, reason="needs two CUDA GPUs")]

MODEL = os.path.join(os.path.dirname(__file__), "..", "..", "models", "efficientnet_lite0.onnx")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from images.prescreen import GPU, screen
    from pipelines.demo import write_photos

    paths = write_photos(str(tmp_path_factory.mktemp("photos")))
    return [open(p, "rb").read() for p in paths if screen(open(p, "rb").read(), 89478485).route == GPU]


def _gpu_of(pointer: int) -> int:
    import cupy

    return int(cupy.cuda.runtime.pointerGetAttributes(pointer).device)


def _scorer(device):
    from images.dali_decoder import DaliDecoderOptions
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from transforms.inference import ScorerLoader

    # The decoder is asked for GPU 0: the loader must move it to its engine's GPU.
    return ScorerLoader(OnnxRuntimeLoader(MODEL, ("cuda",), device=device),
                        DaliDecoderOptions(max_batch=16, device="gpu", device_id=0))()


def test_auto_puts_consecutive_copies_on_both_gpus_each_with_its_decoder(photos, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))  # a fresh round-robin counter
    scorers = [_scorer("auto"), _scorer("auto")]
    try:
        assert [s.engine.device_index() for s in scorers] == [0, 1]
        results = []
        for gpu, scorer in enumerate(scorers):
            assert scorer.decoders.options.device_id == gpu
            stream = scorer.decoders.decode([decode_input(photos)])
            batch = next(stream)
            assert _gpu_of(batch.images.__cuda_array_interface__["data"][0]) == gpu  # decoded on its own GPU
            batch.images.release()
            stream.close()
            scored = scorer.score([(None, photos, decode_input(photos).boxes)], ["logits"])[0]
            assert scored.device == gpu and not scored.failed
            results.append(scored.outputs["logits"])
        # The same photos give the same predictions on either GPU.
        assert results[0].shape == (len(photos), 1000)
        assert (results[0].argmax(1) == results[1].argmax(1)).all()
        assert np.abs(results[0] - results[1]).max() < 1e-3
    finally:
        for s in scorers:
            s.close()
