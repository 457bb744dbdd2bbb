"""GPU placement without a GPU: engine copies spread round-robin over the GPUs, ONNX Runtime told
its device, and the DALI decoder placed on its engine's GPU. The two-GPU run itself needs the GPU machine."""

import numpy as np
import pytest

from engines.base import Engine, EngineError, TensorSpec
from engines.devices import check_device, next_device, resolve_device


def test_next_device_round_robins_through_a_shared_counter(tmp_path):
    counter = str(tmp_path / "counter")
    assert [next_device(2, counter) for _ in range(5)] == [0, 1, 0, 1, 0]
    assert [next_device(3, counter) for _ in range(3)] == [2, 0, 1]  # 5, 6, 7 mod 3


def test_devices_are_checked_and_resolved(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    assert check_device("auto") == "auto" and check_device(1) == 1
    for bad in (-1, "gpu1", True, 1.5):
        with pytest.raises(EngineError, match="GPU index >= 0 or 'auto'"):
            check_device(bad)
    assert [resolve_device("auto", 2) for _ in range(3)] == [0, 1, 0]
    assert resolve_device(1, 2) == 1
    with pytest.raises(EngineError, match="GPU 2 asked for, but this machine has 2"):
        resolve_device(2, 2)


class _FakeSession:
    """Records what ONNX Runtime's InferenceSession is given (no CUDA build of onnxruntime here)."""

    created = []

    def __init__(self, model, sess_options=None, providers=None, provider_options=None):
        self.providers, self.provider_options = providers, provider_options
        _FakeSession.created.append(self)

    def get_providers(self):
        return list(self.providers)

    def get_provider_options(self):
        return {p: dict(o) for p, o in zip(self.providers, self.provider_options)}

    def get_inputs(self):
        return [type("Node", (), {"name": "images", "type": "tensor(uint8)", "shape": ["N", 224, 224, 3]})()]

    def get_outputs(self):
        return [type("Node", (), {"name": "logits", "type": "tensor(float)", "shape": ["N", 1000]})()]


def test_onnxruntime_copies_spread_over_the_gpus_and_each_session_is_told_its_device(
        model_path, tmp_path, monkeypatch):
    import onnxruntime as ort

    from engines import onnxruntime_engine
    from engines.onnxruntime_engine import OnnxRuntimeLoader

    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FakeSession)
    monkeypatch.setattr(onnxruntime_engine, "cuda_device_count", lambda: 2)
    _FakeSession.created = []
    loader = OnnxRuntimeLoader(model_path, ("cuda", "cpu"), device="auto")
    engines = [loader(), loader(), loader()]
    assert [e.device_index() for e in engines] == [0, 1, 0]
    cuda = {"arena_extend_strategy": "kSameAsRequested"}
    assert [s.provider_options for s in _FakeSession.created] == [
        [{"device_id": "0", **cuda}, {}], [{"device_id": "1", **cuda}, {}], [{"device_id": "0", **cuda}, {}]]
    fixed = OnnxRuntimeLoader(model_path, ("cuda",), device=1)()
    assert fixed.device_index() == 1
    with pytest.raises(EngineError, match="GPU 5 asked for"):
        OnnxRuntimeLoader(model_path, ("cuda",), device=5)()
    assert OnnxRuntimeLoader(model_path, ("cpu",))().device_index() is None  # real CPU session: no GPU


class _OnGpu(Engine):
    kind = "stub"

    def __init__(self, gpu):
        self._gpu = gpu
        self._inputs = {"images": TensorSpec("images", np.uint8, (-1, 224, 224, 3))}
        self._outputs = {"logits": TensorSpec("logits", np.float32, (-1, 10))}

    def device_index(self):
        return self._gpu

    def infer(self, feed, outputs=None):
        return {"logits": np.zeros((len(feed["images"]), 10), np.float32)}


def test_the_decoder_sits_on_its_engines_gpu(monkeypatch):
    from images import decoder_service
    from images.dali_decoder import DaliDecoderOptions
    from transforms.inference import ScorerLoader

    built = []
    monkeypatch.setattr(decoder_service, "DecoderService", lambda options, name: built.append(options) or object())
    for gpu in (1, 0):
        ScorerLoader(lambda gpu=gpu: _OnGpu(gpu), DaliDecoderOptions(device="gpu", device_id=0))()
    assert [o.device_id for o in built] == [1, 0]
    ScorerLoader(lambda: _OnGpu(1), DaliDecoderOptions(device="cpu"))()  # a CPU graph has no GPU to follow
    assert built[-1].device == "cpu" and built[-1].device_id == 0


def test_every_engine_copy_on_a_gpu_takes_the_next_gpu(model_path):
    """One copy per SDK process (Dataflow, multi_processing) or per --model_copies: each must take the
    next GPU, or every process of a two-GPU worker would crowd GPU 0."""
    from pipelines.settings import resolve

    def recipe(*flags):
        return resolve(["--input", "x", "--output", "y", *flags], start_checks=False)[0].recipe

    assert recipe("--providers", "cuda", "--share_model_across_processes", "--model_copies", "2").loader.device == "auto"
    assert recipe("--providers", "cuda").loader.device == "auto"
    assert recipe("--model_copies", "2", "--share_model_across_processes").loader.device == 0  # on the CPU


def test_one_gpu_needs_no_counter(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "missing"))  # no counter file can be made
    assert [resolve_device("auto", 1), resolve_device("auto", 0)] == [0, 0]


def test_stats_count_the_images_each_device_scored():
    from pipelines.classify_images import per_device
    from pipelines.run_record import build_stats
    from transforms.timing import device_counter

    counters = {"predictions": 7, device_counter(0): 4, device_counter(1): 3}
    stats = build_stats({"counters": counters, "distributions": {}, "buckets": {}}, 1.0, 7, {}, {})
    assert stats["images_per_device"] == {"gpu0": 4, "gpu1": 3}
    assert per_device(stats) == " (gpu0 4, gpu1 3 images)"
    assert per_device({"images_per_device": {"cpu": 7}}) == ""


def _old_cuda_python(monkeypatch, count=2):
    """cuda-python 12.4/12.5 as its modules look: no ``cuda.bindings``; the runtime is ``cuda.cudart``
    (``from cuda import cudart``), whose calls return ``(cudaError_t, value)`` with an IntEnum status."""
    import enum
    import sys
    import types

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorNoDevice = 100

    cudart = types.ModuleType("cuda.cudart")
    cudart.cudaError_t = cudaError_t
    cudart.cudaGetDeviceCount = lambda: (cudaError_t.cudaSuccess, count) if count else (cudaError_t.cudaErrorNoDevice, 0)
    package = types.ModuleType("cuda")
    package.__path__ = []
    package.cudart = cudart
    for name, module in (("cuda", package), ("cuda.cudart", cudart), ("cuda.bindings", None),
                         ("cuda.bindings.runtime", None)):
        monkeypatch.setitem(sys.modules, name, module)
    return cudart


def test_gpus_are_counted_with_the_cuda_python_12_4_module_layout(monkeypatch):
    """setup.py allows cuda-python >= 12.4; before 12.6 there is no cuda.bindings, and GPU decode said
    "no CUDA device is visible" on a GPU machine while the TensorRT engine (which had the fallback) ran."""
    from engines import devices
    from images.dali_decoder import gpu_decode_unavailable
    from engines import cuda as trt_cuda

    old = _old_cuda_python(monkeypatch, count=2)
    monkeypatch.setattr(trt_cuda, "_cudart", None)
    assert devices.cuda_device_count() == 2
    assert devices.cuda_runtime() is old and trt_cuda.cudart() is old  # one lookup, used by both
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    assert gpu_decode_unavailable() is None
    _old_cuda_python(monkeypatch, count=0)
    assert devices.cuda_device_count() == 0


def test_the_cuda_python_12_6_and_later_layout_comes_first(monkeypatch):
    """The real bindings (cuda-python 13 here): cuda.bindings.runtime answers, even with an old-layout
    module beside it."""
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python >= 12.6 is not installed")
    from engines import devices

    assert devices.cuda_runtime() is runtime
    err, count = runtime.cudaGetDeviceCount()
    assert devices.cuda_device_count() == (int(count) if int(err) == 0 else 0)


def test_without_cuda_python_there_is_no_gpu_and_the_error_names_the_fix(no_tensorrt):
    from engines import devices

    assert devices.cuda_device_count() == 0
    with pytest.raises(ImportError, match=r"cuda-python is not importable .*pip install cuda-python"):
        devices.cuda_runtime()
