"""Real TensorRT on a real GPU: build tiny engines, run dynamic batches, compare with ONNX Runtime.

Runs inside the image built from Dockerfile on a GPU machine:

    docker run --gpus all --rm --entrypoint python3 IMAGE -m pytest -m gpu tests/gpu -v
"""

import hashlib
import os
import sys

import numpy as np
import pytest

from engines.base import EngineError


def _missing():
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"needs the full TensorRT Python package (the image built from Dockerfile): {e}"
    try:
        from engines import cuda

        cuda.device_count()
    except (ImportError, EngineError) as e:
        return f"needs a CUDA GPU and cuda-python: {e}"
    return None


REASON = _missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def reference(model_bytes):
    from engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(model_bytes)


def images(n, seed=0, size=16):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def classifier():
    from tests.tensorrt_models import image_classifier

    return image_classifier()


@pytest.fixture(scope="module")
def fp32_engine(classifier):
    from engines.tensorrt import BuildOptions, EngineFromOnnx, TensorRTEngine

    plan = EngineFromOnnx(classifier, BuildOptions(profiles=["1,4,8", "9,16,32"]))()
    with TensorRTEngine(plan, num_contexts=2, name="tiny fp32") as engine:
        yield engine


def test_dynamic_batches_match_onnxruntime(fp32_engine, classifier):
    ref = reference(classifier)
    assert fp32_engine.profiles == [(1, 4, 8), (9, 16, 32)]
    # Each profile is in the plan once and both contexts use them (TensorRT 10+: contexts may share a profile).
    assert fp32_engine.describe()["contexts"] == 2
    assert fp32_engine.input_specs["images"].describe() == "images: uint8[N, 16, 16, 3]"
    assert fp32_engine.output_specs["logits"].describe() == "logits: float32[N, 10]"
    for n in (1, 5, 8, 9, 32, 33, 70):  # 33 and 70 are split across the largest profile
        x = images(n, seed=n)
        got, want = fp32_engine.infer({"images": x})["logits"], ref.infer({"images": x})["logits"]
        assert got.shape == (n, 10)
        # fp32 builds may use TF32 on Ampere and newer.
        np.testing.assert_allclose(got, want, atol=5e-3, rtol=1e-3)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_device_inputs_match_host_inputs(fp32_engine):
    """CuPy arrays are read on the device (copied device-to-device), padded and split there."""
    cupy = pytest.importorskip("cupy", reason="CuPy is in the Dockerfile's test stage, not the worker image")
    for n in (1, 9, 33, 70):
        x = images(n, seed=200 + n)
        host = fp32_engine.infer({"images": x})["logits"]
        np.testing.assert_array_equal(fp32_engine.infer({"images": cupy.asarray(x)}, outputs=["logits"])["logits"],
                                      host)


def test_infer_many_and_threads(fp32_engine, classifier):
    import threading

    ref = reference(classifier)
    feeds = [{"images": images(n, seed=100 + n)} for n in (3, 40, 1, 16)]
    for f, out in zip(feeds, fp32_engine.infer_many(feeds)):
        np.testing.assert_allclose(out["logits"], ref.infer(f)["logits"], atol=5e-3, rtol=1e-3)
    errors = []

    def work(k):
        try:
            for i in range(5):
                x = images(1 + (k * 5 + i) % 32, seed=k * 10 + i)
                np.testing.assert_allclose(fp32_engine.infer({"images": x})["logits"],
                                           ref.infer({"images": x})["logits"], atol=5e-3, rtol=1e-3)
        except Exception as e:  # asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []


def test_fp16_engine_within_fp16_tolerance(classifier):
    from engines.tensorrt import BuildOptions, EngineFromOnnx, TensorRTEngine

    plan = EngineFromOnnx(classifier, BuildOptions(profiles=["1,8,16"], precision="fp16"))()
    ref = reference(classifier)
    with TensorRTEngine(plan) as engine:
        assert engine.input_specs["images"].dtype == np.uint8
        assert engine.output_specs["logits"].dtype == np.float32
        x = images(16, seed=3)
        np.testing.assert_allclose(engine.infer({"images": x})["logits"], ref.infer({"images": x})["logits"],
                                   atol=0.05, rtol=0.02)


def test_multiple_named_inputs_and_outputs():
    from engines.tensorrt import BuildOptions, EngineFromOnnx, TensorRTEngine
    from tests.tensorrt_models import two_in_two_out

    plan = EngineFromOnnx(two_in_two_out(), BuildOptions(profiles=["2,4,8"]))()
    with TensorRTEngine(plan) as engine:
        assert {n: s.dtype for n, s in engine.input_specs.items()} == {"a": np.float32, "b": np.int32}
        assert {n: s.dtype for n, s in engine.output_specs.items()} == {"sum": np.float32, "flag": np.bool_}
        rng = np.random.default_rng(0)
        a = rng.normal(size=(8, 4)).astype(np.float32) * 5
        b = rng.integers(-5, 5, size=(8, 4)).astype(np.int32)
        out = engine.infer({"a": a, "b": b})
        np.testing.assert_array_equal(out["sum"], a + b.astype(np.float32))
        np.testing.assert_array_equal(out["flag"], a > b)
        # Below the profile min (2): padded by repeating the last row, the padding's outputs dropped.
        one = engine.infer({"a": a[:1], "b": b[:1]})
        assert one["sum"].shape == (1, 4) and one["flag"].shape == (1, 4)
        np.testing.assert_array_equal(one["sum"], a[:1] + b[:1].astype(np.float32))
        # Above the profile max (8): split into chunks within the profile.
        a2, b2 = np.concatenate([a, a[:3]]), np.concatenate([b, b[:3]])
        np.testing.assert_array_equal(engine.infer({"a": a2, "b": b2})["sum"], a2 + b2.astype(np.float32))
        # A fixed dimension that does not match is refused before anything is enqueued.
        with pytest.raises(EngineError, match=r"Input tensor: a \| .*\(2, 5\)"):
            engine.infer({"a": np.zeros((2, 5), np.float32), "b": np.zeros((2, 5), np.int32)})


def test_cuda_graphs_give_the_same_results(classifier):
    from engines.tensorrt import BuildOptions, EngineFromOnnx, TensorRTEngine

    plan = EngineFromOnnx(classifier, BuildOptions(profiles=["1,8,16"]))()
    with TensorRTEngine(plan, cuda_graphs=True, num_contexts=1) as graphs, TensorRTEngine(plan) as plain:
        # Alternating shapes on one context: a graph captured for 8 must not replay right after a 3
        # ran (it would skip the enqueue that applies set_input_shape); the last 8 follows an 8.
        for i, n in enumerate((8, 3, 8, 3, 8, 8)):
            x = images(n, seed=i)
            np.testing.assert_array_equal(graphs.infer({"images": x})["logits"], plain.infer({"images": x})["logits"])
        counts = graphs.describe()["enqueues"]
        assert counts.get("graph_launch", 0) >= 1, counts


def test_engine_cache_builds_once_then_loads(classifier, tmp_path):
    from engines.tensorrt import BuildOptions, TensorRTLoader

    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(classifier)
    loader = TensorRTLoader(onnx_path=str(onnx_path), engine_cache=str(tmp_path / "cache"),
                            build_options=BuildOptions(profiles=["1,4,8"]))
    with loader() as engine:
        x = images(4)
        first = engine.infer({"images": x})["logits"]
    plans = [f for f in os.listdir(tmp_path / "cache") if f.endswith(".plan")]
    assert len(plans) == 1
    mtime = os.path.getmtime(tmp_path / "cache" / plans[0])
    with loader() as engine:
        np.testing.assert_array_equal(engine.infer({"images": x})["logits"], first)
    assert os.path.getmtime(tmp_path / "cache" / plans[0]) == mtime  # read, not rebuilt


def test_build_and_validate_commands(classifier, tmp_path):
    from model_tools import build, validate
    from engines.tensorrt.plan import read_sidecar

    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(classifier)
    plan = tmp_path / "tiny.plan"
    assert build.main(["--onnx", str(onnx_path), "--output", str(plan), "--min_batch", "1", "--opt_batch", "4",
                       "--max_batch", "16", "--timing_cache", str(tmp_path / "timing.cache")]) == 0
    info = read_sidecar(str(plan))
    assert info.onnx_sha256 == hashlib.sha256(classifier).hexdigest()
    assert info.labels and info.labels[0] == "class_0"
    assert os.path.getsize(tmp_path / "timing.cache") > 0
    assert validate.main(["--engine_path", str(plan), "--reference", str(onnx_path), "--batch_size", "4"]) == 0


def test_plan_from_another_major_is_refused(fp32_engine, classifier):
    from engines.tensorrt import BuildOptions, EngineFromOnnx, TensorRTEngine

    plan = bytearray(EngineFromOnnx(classifier, BuildOptions(profiles=["1,1,1"]))())
    plan[24] += 1
    with pytest.raises(EngineError, match="plans never load across major versions"):
        TensorRTEngine(bytes(plan))


def test_version_compatible_plan_runs_on_the_lean_runtime(classifier, monkeypatch):
    pytest.importorskip("tensorrt_lean", reason="the lean runtime (tensorrt-lean) is not installed")
    import tensorrt

    from engines.tensorrt import BuildOptions, EngineFromOnnx, TensorRTEngine
    import tensorrt_lean

    if tensorrt_lean.__version__.split(".")[:3] != tensorrt.__version__.split(".")[:3]:
        pytest.skip(f"lean runtime {tensorrt_lean.__version__} differs from tensorrt {tensorrt.__version__}")
    plan = EngineFromOnnx(classifier, BuildOptions(profiles=["1,4,8"], version_compatible=True))()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with TensorRTEngine(plan) as engine:
        x = images(4)
        np.testing.assert_allclose(engine.infer({"images": x})["logits"],
                                   reference(classifier).infer({"images": x})["logits"], atol=5e-3, rtol=1e-3)
