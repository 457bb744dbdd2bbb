"""The ONNX Runtime engine: named inputs and outputs, feed errors, providers, sessions, spinning."""

from __future__ import annotations

import numpy as np
import pytest

from engines.base import EngineError, TensorSpec, check_feed
from engines.onnxruntime_engine import OnnxRuntimeEngine, OnnxRuntimeLoader


def test_multiple_named_inputs_and_outputs(multi_model):
    engine = OnnxRuntimeLoader(multi_model)()
    assert engine.input_specs == {"a": TensorSpec("a", np.float32, (-1, 3)), "b": TensorSpec("b", np.int64, (-1, 1))}
    assert [s.dtype for s in engine.output_specs.values()] == [np.float32, np.bool_]
    feed = {"a": np.array([[1.0, 5.0, -2.0], [0.5, 0.0, 9.0]], np.float32), "b": np.array([[2], [-1]], np.int64)}
    results = engine.infer(feed)
    np.testing.assert_allclose(results["c"][0], [3.0, 7.0, 0.0])
    np.testing.assert_array_equal(results["flag"], [[False, True, False], [True, True, True]])
    assert list(engine.infer(feed, outputs=["flag"])) == ["flag"]  # only the outputs asked for
    with pytest.raises(EngineError, match=r"\['nope'\] are not outputs of the model"):
        engine.infer(feed, outputs=["nope"])


def test_feed_errors_name_the_tensor_and_the_fix(sum_model):
    engine = OnnxRuntimeEngine(sum_model)
    with pytest.raises(EngineError, match="Input tensor: x \\| Received unexpected dtype: float32. "
                                          "Note: Expected type: uint8"):
        engine.infer({"x": np.zeros((1, 4, 4, 3), np.float32)})
    with pytest.raises(EngineError, match="Input tensor: x \\| Received shape \\(2, 5, 4, 3\\), dimension 1 is 5"):
        engine.infer({"x": np.zeros((2, 5, 4, 3), np.uint8)})
    with pytest.raises(EngineError, match="missing: \\['x'\\] \\| unexpected: \\['images'\\]"):
        engine.infer({"images": np.zeros((1, 4, 4, 3), np.uint8)})
    specs = {"a": TensorSpec("a", np.float32, (-1, 3)), "b": TensorSpec("b", np.float32, (-1, 3))}
    with pytest.raises(EngineError, match="batch size 1 differs from the other inputs' batch size 2"):
        check_feed(specs, {"a": np.zeros((2, 3), np.float32), "b": np.zeros((1, 3), np.float32)})


def test_missing_provider_is_an_error_not_a_silent_cpu_fallback(sum_model):
    with pytest.raises(EngineError, match="CUDAExecutionProvider.*not available.*onnxruntime-gpu"):
        OnnxRuntimeEngine(sum_model, providers=("cuda",))


def test_missing_model_file_names_the_fix(tmp_path):
    with pytest.raises(EngineError, match="Model file not found: .*nope.onnx. Prepare the default model with `make model`"):
        OnnxRuntimeLoader(str(tmp_path / "nope.onnx"))()


def test_several_sessions_serve_concurrent_batches(sum_model):
    # Each concurrent infer call takes a free session (its own thread pool); results must not mix.
    import concurrent.futures

    engine = OnnxRuntimeLoader(sum_model, intra_op_threads=1, sessions=2)()
    assert engine.describe()["sessions"] == 2 and len(engine._sessions) == 2
    assert engine.concurrent_calls() == 2  # what a scorer sizes its score-ahead threads by
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8) for n in (1, 3, 2, 4, 3, 1)]
    single = OnnxRuntimeEngine(sum_model, intra_op_threads=1)
    want = [single.infer({"x": b})["doubled"] for b in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: engine.infer({"x": b})["doubled"], batches))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert engine._free.qsize() == 2  # every session was given back
    with pytest.raises(EngineError, match="sessions must be >= 1"):
        OnnxRuntimeLoader(sum_model, sessions=0)


@pytest.mark.parametrize("flag,allow,stop", [("off", "0", ""), ("on", "1", ""), ("run", "1", "1")])
def test_spinning_flag_reaches_the_session_options(sum_model, monkeypatch, flag, allow, stop):
    import onnxruntime as ort
    from pipelines.classify_images import make_handler
    from pipelines.settings import resolve

    seen = []
    real = ort.InferenceSession

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # onnxruntime's answer for a key that was never set
            return ""

    def spy(model, sess_options=None, providers=None, provider_options=None):
        seen.append({key: entry(sess_options, key)
                     for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop")})
        return real(model, sess_options=sess_options, providers=providers, provider_options=provider_options)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    # A tiny model: what is checked is the session options each of the two sessions gets.
    # (Its one output holds one value per image: --activation none, since softmax over one value is refused.)
    settings, _ = resolve(["--input", "x", "--output", "y", "--ort_spinning", flag, "--ort_sessions", "2",
                           "--model", sum_model, "--activation", "none"], start_checks=False)
    handler, info = make_handler(settings), settings.engine_record()
    engine = handler.load_model().engine
    assert info["ort_spinning"] == flag and info["ort_sessions"] == 2
    assert seen == [{"session.intra_op.allow_spinning": allow, "session.force_spinning_stop": stop}] * 2
    assert engine.infer({"x": np.ones((1, 4, 4, 3), np.uint8)})["total"].tolist() == [48.0]


def test_fp16_converts_the_model_where_it_loads_and_keeps_uint8_in_and_float32_out(model_path):
    from engines.activations import apply_activation
    from tests.model_variants import crops

    batch = crops(224, 224)
    with OnnxRuntimeLoader(model_path)() as fp32, OnnxRuntimeLoader(model_path, precision="fp16")() as fp16:
        assert fp16.input_specs["images"].dtype == np.uint8
        want, got = fp32.infer({"images": batch})["logits"], fp16.infer({"images": batch})["logits"]
    assert got.dtype == np.float32 and (want.argmax(1) == got.argmax(1)).all()
    assert 0 < np.abs(want - got).max() < 0.1
    assert np.abs(apply_activation(want, "softmax") - apply_activation(got, "softmax")).max() < 0.01
    with pytest.raises(EngineError, match="precision must be one of"):
        OnnxRuntimeLoader(model_path, precision="int4")


def test_the_precision_flag_reaches_the_loader_and_stats(model_path):
    from pipelines.settings import resolve

    settings, _ = resolve(["--input", "x", "--output", "y", "--precision", "fp16"], start_checks=False)
    assert settings.recipe.loader.precision == "fp16" and settings.engine_record()["precision"] == "fp16"
    settings, _ = resolve(["--input", "x", "--output", "y"], start_checks=False)
    assert settings.recipe.loader.precision == "fp32"
    trt, _ = resolve(["--input", "x", "--output", "y", "--engine", "tensorrt", "--onnx_path", model_path,
                      "--batch_size", "8"], start_checks=False)
    assert trt.recipe.loader.build_options.precision == "fp16"  # TensorRT's own default
