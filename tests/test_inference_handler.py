"""The engine ModelHandler: batches of 1, odd sizes, splitting, multiple named inputs/outputs, errors."""

from __future__ import annotations

import pickle

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from engines.base import EngineError, TensorSpec, check_feed
from engines.onnxruntime_engine import OnnxRuntimeEngine, OnnxRuntimeLoader
from transforms.inference import EngineModelHandler, split_batch


def _images(n, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8))


@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_batches_of_any_size_give_one_result_per_example(sum_model, n):
    handler = EngineModelHandler(OnnxRuntimeLoader(sum_model))
    engine = handler.load_model()
    batch = _images(n, seed=n)
    results = list(handler.run_inference(batch, engine))
    assert len(results) == n
    for example, result in zip(batch, results):
        assert set(result.inference) == {"total", "doubled"}
        np.testing.assert_allclose(result.inference["total"], example.astype(np.float64).sum(), rtol=1e-6)
        np.testing.assert_array_equal(result.inference["doubled"], example.astype(np.float32) * 2)
        assert result.example is None  # pixels are not carried downstream


def test_batches_larger_than_the_engine_max_are_split(sum_model):
    class Capped(OnnxRuntimeEngine):
        chunks = []

        @property
        def max_batch_size(self):
            return 4

        def infer(self, feed):
            Capped.chunks.append(len(feed["x"]))
            return super().infer(feed)

    handler = EngineModelHandler(lambda: Capped(sum_model), max_batch_size=16)
    batch = _images(11, seed=3)
    results = list(handler.run_inference(batch, handler.load_model()))
    assert Capped.chunks == [4, 4, 3]  # even chunks; the last reads only its own rows
    np.testing.assert_allclose([r.inference["total"] for r in results],
                               [b.astype(np.float64).sum() for b in batch], rtol=1e-6)


def test_split_batch():
    assert split_batch(5, None) == [slice(0, 5)]
    assert split_batch(5, 8) == [slice(0, 5)]
    assert split_batch(9, 4) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    assert [c.stop - c.start for c in split_batch(150, 64)] == [50, 50, 50]
    assert [c.stop - c.start for c in split_batch(129, 64)] == [43, 43, 43]
    assert [c.stop - c.start for c in split_batch(130, 64)] == [44, 43, 43]


def test_multiple_named_inputs_and_outputs(multi_model):
    handler = EngineModelHandler(OnnxRuntimeLoader(multi_model))
    engine = handler.load_model()
    assert engine.input_specs == {"a": TensorSpec("a", np.float32, (-1, 3)), "b": TensorSpec("b", np.int64, (-1, 1))}
    assert [s.dtype for s in engine.output_specs.values()] == [np.float32, np.bool_]
    batch = [{"a": np.array([1.0, 5.0, -2.0], np.float32), "b": np.array([2], np.int64)},
             {"a": np.array([0.5, 0.0, 9.0], np.float32), "b": np.array([-1], np.int64)}]
    results = list(handler.run_inference(batch, engine))
    np.testing.assert_allclose(results[0].inference["c"], [3.0, 7.0, 0.0])
    np.testing.assert_array_equal(results[1].inference["flag"], [True, True, True])
    np.testing.assert_array_equal(results[0].inference["flag"], [False, True, False])
    with pytest.raises(EngineError, match="has 2 inputs .* pass each example as a dict"):
        list(handler.run_inference([np.zeros(3, np.float32)], engine))


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


def test_handler_is_a_small_picklable_recipe(sum_model):
    handler = EngineModelHandler(OnnxRuntimeLoader(sum_model, ("cpu",), 2), min_batch_size=3, max_batch_size=9,
                                 share_across_processes=True, model_copies=2)
    clone = pickle.loads(pickle.dumps(handler))
    assert clone.batch_elements_kwargs() == {"min_batch_size": 3, "max_batch_size": 9}
    assert clone.share_model_across_processes() and clone.model_copies() == 2
    assert clone.loader == OnnxRuntimeLoader(sum_model, ("cpu",), 2)
    with pytest.raises(EngineError, match="model_copies > 1 needs share_across_processes"):
        EngineModelHandler(OnnxRuntimeLoader(sum_model), model_copies=2)
    with pytest.raises(EngineError, match="min_batch_size <= max_batch_size"):
        EngineModelHandler(OnnxRuntimeLoader(sum_model), min_batch_size=8, max_batch_size=4)


def test_keyed_run_inference_with_a_short_last_batch(sum_model):
    images = _images(10, seed=11)
    expected = [(f"img{i}", float(img.astype(np.float64).sum())) for i, img in enumerate(images)]
    handler = EngineModelHandler(OnnxRuntimeLoader(sum_model), min_batch_size=4, max_batch_size=4)
    with TestPipeline() as p:
        results = (p | beam.Create([(f"img{i}", img) for i, img in enumerate(images)])
                   | RunInference(KeyedModelHandler(handler))
                   | beam.MapTuple(lambda key, result: (key, float(result.inference["total"]))))
        assert_that(results, equal_to(expected))


def test_several_sessions_serve_concurrent_batches(model_path):
    # Each concurrent infer call takes a free session (its own thread pool); results must not mix.
    import concurrent.futures

    engine = OnnxRuntimeLoader(model_path, intra_op_threads=1, sessions=2)()
    assert engine.describe()["sessions"] == 2 and len(engine._sessions) == 2
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 256, size=(n, 224, 224, 3), dtype=np.uint8) for n in (1, 3, 2, 4, 3, 1)]
    single = OnnxRuntimeEngine(model_path, intra_op_threads=1)
    want = [single.infer({"images": b})["logits"] for b in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda b: engine.infer({"images": b})["logits"], batches))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert engine._free.qsize() == 2  # every session was given back
    with pytest.raises(EngineError, match="sessions must be >= 1"):
        OnnxRuntimeLoader(model_path, sessions=0)


@pytest.mark.parametrize("flag,allow,stop", [("off", "0", ""), ("on", "1", ""), ("run", "1", "1")])
def test_spinning_flag_reaches_the_session_options(model_path, monkeypatch, flag, allow, stop):
    import onnxruntime as ort
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.classify_images import ClassifyOptions, make_handler

    seen = []
    real = ort.InferenceSession

    def entry(options, key):
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # onnxruntime's answer for a key that was never set
            return ""

    def spy(model, sess_options=None, providers=None):
        seen.append({key: entry(sess_options, key)
                     for key in ("session.intra_op.allow_spinning", "session.force_spinning_stop")})
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    opts = PipelineOptions(["--ort_spinning", flag, "--ort_sessions", "2"]).view_as(ClassifyOptions)
    handler, info, _ = make_handler(opts)
    engine = handler.load_model().engine
    assert info["ort_spinning"] == flag and info["ort_sessions"] == 2
    assert seen == [{"session.intra_op.allow_spinning": allow, "session.force_spinning_stop": stop}] * 2
    assert engine.infer({"images": np.zeros((1, 224, 224, 3), np.uint8)})["logits"].shape == (1, 1000)
