"""The TensorRT handler and pipeline build, pickle and submit with no TensorRT or CUDA installed,
and the validate command's logic, with ONNX Runtime on both sides."""

from __future__ import annotations

import logging
import pickle
import sys

import numpy as np
import pytest

from engines.base import Engine, EngineError
from engines.onnxruntime_engine import OnnxRuntimeEngine
from engines.tensorrt.options import BuildOptions, Profile
from engines.tensorrt.plan import PlanInfo, write_sidecar
from tests.tensorrt_models import LABELS, image_classifier


def handler_class():
    pytest.importorskip("apache_beam", reason="the handler is a Beam ModelHandler: needs apache-beam")
    from transforms.tensorrt_handler import TensorRTModelHandler

    return TensorRTModelHandler


@pytest.fixture
def no_tensorrt(monkeypatch):
    """As on a laptop: importing tensorrt, tensorrt_lean, cuda or cupy fails."""
    for name in ("tensorrt", "tensorrt_lean", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)
    from engines.tensorrt import cuda

    monkeypatch.setattr(cuda, "_cudart", None)


@pytest.fixture
def plan_path(tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(b"ftrt" + bytes(20) + bytes([10, 11, 0, 33]) + bytes(36))
    write_sidecar(str(path), PlanInfo(
        tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
        profiles=(Profile(1, 8, 16), Profile(17, 128, 256)), precision="fp16", onnx_sha256="0" * 64,
        labels=tuple(LABELS)))
    return str(path)


def test_engine_path_handler_aligns_batches_to_the_sidecar(no_tensorrt, plan_path, caplog):
    TensorRTModelHandler = handler_class()

    with caplog.at_level(logging.INFO, logger="transforms.tensorrt_handler"):
        handler = TensorRTModelHandler(engine_path=plan_path)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 128, "max_batch_size": 256}
    assert [r.getMessage() for r in caplog.records] == [
        f"tensorrt: batch sizes min=128 max=256; chosen from {plan_path}.json profile [17..256] opt 128"]
    assert handler.get_metrics_namespace() == "tensorrt"
    assert handler.labels() == LABELS
    info = handler.describe_engine()
    assert info["precision"] == "fp16" and info["built_on"] == "NVIDIA L4 (compute 8.9)"
    assert info["profiles"] == [{"min": 1, "opt": 8, "max": 16}, {"min": 17, "opt": 128, "max": 256}]
    clone = pickle.loads(pickle.dumps(handler))
    assert clone.loader == handler.loader and clone.batch_elements_kwargs() == handler.batch_elements_kwargs()
    assert "tensorrt" not in sys.modules or sys.modules["tensorrt"] is None


def test_explicit_batch_sizes_and_copies_per_gpu(no_tensorrt, plan_path, caplog):
    TensorRTModelHandler = handler_class()

    with caplog.at_level(logging.INFO, logger="transforms.tensorrt_handler"):
        handler = TensorRTModelHandler(engine_path=plan_path, min_batch_size=32, max_batch_size=512,
                                       share_across_processes=True, model_copies=2)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 32, "max_batch_size": 512}
    assert "batches above 256 are split" in caplog.records[-1].getMessage()
    assert handler.share_model_across_processes() and handler.model_copies() == 2
    assert handler.loader.device == "auto"
    with pytest.raises(EngineError, match="model_copies > 1 needs share_across_processes=True"):
        TensorRTModelHandler(engine_path=plan_path, model_copies=2)


def test_onnx_path_handler_reads_batches_from_build_options(no_tensorrt):
    TensorRTModelHandler = handler_class()

    options = BuildOptions(profiles=["4,32,64"], precision="fp16")
    handler = TensorRTModelHandler(onnx_path="gs://bucket/model.onnx", engine_cache="gs://bucket/plans",
                                   build_options=options)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 32, "max_batch_size": 64}
    assert handler.loader.build_options == options and handler.loader.engine_cache == "gs://bucket/plans"
    assert handler.describe_engine()["precision"] == "fp16"
    assert pickle.loads(pickle.dumps(handler)).loader == handler.loader


def test_plan_without_sidecar_needs_batch_sizes(no_tensorrt, tmp_path):
    TensorRTModelHandler = handler_class()

    plan = str(tmp_path / "bare.plan")
    with pytest.raises(EngineError, match=r"No sidecar .*bare.plan.json beside the plan.*or pass max_batch_size"):
        TensorRTModelHandler(engine_path=plan)
    handler = TensorRTModelHandler(engine_path=plan, max_batch_size=64)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 64, "max_batch_size": 64}


def test_load_model_without_tensorrt_fails_with_the_fix(no_tensorrt, plan_path):
    TensorRTModelHandler = handler_class()

    handler = TensorRTModelHandler(engine_path=plan_path)
    with pytest.raises(ImportError, match=r"TensorRT is not importable .*Use the image built from Dockerfile"):
        handler.load_model()


def test_from_options_with_the_pipeline_flags(no_tensorrt, plan_path):
    pytest.importorskip("pipelines.classify_images")
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.classify_images import ClassifyOptions
    TensorRTModelHandler = handler_class()

    opts = PipelineOptions(["--input", "x", "--output", "y", "--engine", "tensorrt", "--onnx_path", "m.onnx",
                            "--engine_cache", "gs://b/plans", "--precision", "fp16", "--batch_size", "48"]
                           ).view_as(ClassifyOptions)
    handler = TensorRTModelHandler.from_options(opts, min_batch_size=12)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 12, "max_batch_size": 48}
    assert handler.loader.build_options.profiles == (Profile(1, 48, 48),)
    assert handler.loader.build_options.precision == "fp16"
    opts = PipelineOptions(["--input", "x", "--output", "y", "--engine", "tensorrt", "--engine_path", plan_path,
                            "--batch_size", "64"]).view_as(ClassifyOptions)
    handler = TensorRTModelHandler.from_options(opts)
    assert handler.batch_elements_kwargs() == {"min_batch_size": 64, "max_batch_size": 64}


def test_build_flags_with_a_built_plan_are_reported_as_ignored(no_tensorrt, plan_path, caplog):
    pytest.importorskip("pipelines.classify_images")
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.classify_images import ClassifyOptions
    TensorRTModelHandler = handler_class()

    def warnings_for(*flags):
        caplog.clear()
        opts = PipelineOptions(["--input", "x", "--output", "y", "--engine", "tensorrt", "--engine_path", plan_path,
                                *flags]).view_as(ClassifyOptions)
        with caplog.at_level(logging.WARNING, logger="transforms.tensorrt_handler"):
            TensorRTModelHandler.from_options(opts)
        return [r.getMessage() for r in caplog.records]

    assert warnings_for() == []  # the default --precision fp16 matches the fp16 plan
    (message,) = warnings_for("--trt_profile", "1,4,8", "--workspace_gib", "2", "--precision", "fp32")
    assert message.startswith("ignored with --engine_path, which loads a plan as it was built: --trt_profile, "
                              "--workspace_gib, --precision fp32 (the plan is fp16)")


def test_num_contexts_is_the_runtimes_choice_not_the_plans(no_tensorrt):
    """Contexts share the plan's profiles (TensorRT 10.x/11.x): any number of contexts runs one plan,
    and changing --num_contexts neither rebuilds the plan nor changes its engine-cache key."""
    pytest.importorskip("pipelines.classify_images")
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.classify_images import ClassifyOptions
    TensorRTModelHandler = handler_class()

    def handler_for(n):
        opts = PipelineOptions(["--input", "x", "--output", "y", "--engine", "tensorrt", "--onnx_path", "m.onnx",
                                "--num_contexts", str(n)]).view_as(ClassifyOptions)
        return TensorRTModelHandler.from_options(opts)

    one, four = handler_for(1), handler_for(4)
    assert four.loader.num_contexts == 4
    assert one.loader.build_options.cache_key() == four.loader.build_options.cache_key()
    handler = TensorRTModelHandler(onnx_path="m.onnx", build_options=BuildOptions(), num_contexts=4)
    assert handler.loader.num_contexts == 4


def test_pipeline_with_tensorrt_handler_is_submittable(no_tensorrt, plan_path, tmp_path):
    """The job graph builds and serializes (what submitting does) with no TensorRT here."""
    TensorRTModelHandler = handler_class()
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

    handler = TensorRTModelHandler(engine_path=plan_path)
    pipeline = beam.Pipeline()
    _ = (pipeline | beam.Create([("a", np.zeros((16, 16, 3), np.uint8))])
         | RunInference(KeyedModelHandler(handler)).with_exception_handling())
    proto = pipeline.to_runner_api()
    assert any("RunInference" in t.unique_name for t in proto.components.transforms.values())


@pytest.mark.parametrize("source", ["engine_path", "onnx_path"])
def test_classify_images_job_with_engine_tensorrt_builds_and_serializes(no_tensorrt, plan_path, tmp_path, source):
    """The whole CLI job graph with --engine tensorrt, as submitted to a runner, with no TensorRT here."""
    pytest.importorskip("pipelines.classify_images")
    import apache_beam as beam
    from apache_beam.internal import pickler
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines import classify_images
    from pipelines.classify_images import ClassifyOptions
    from tests.tensorrt_models import image_classifier

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8")
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(image_classifier())
    model_flags = (["--engine_path", plan_path] if source == "engine_path" else
                   ["--onnx_path", str(onnx_path), "--engine_cache", str(tmp_path / "cache"), "--trt_profile", "1,8,16"])
    options = PipelineOptions(["--input", str(images), "--output", str(tmp_path / "out"), "--engine", "tensorrt",
                               "--crop", "16", "--resize", "16", *model_flags])
    opts = options.view_as(ClassifyOptions)
    classify_images.check_input(opts.input)
    classify_images.check_setup(opts)  # the ONNX model's input fits --crop 16
    handler, info, labels = classify_images.make_handler(opts)
    assert info["engine"] == "tensorrt" and labels == LABELS
    assert handler.images_per_batch == (256 if source == "engine_path" else 16)
    pipeline = beam.Pipeline(options=options)
    classify_images.build_pipeline(pipeline, opts, handler, labels)
    proto = pipeline.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"FindImages", "ReadBatches", "RunInference", "TopK"} <= {n.split("/")[0] for n in names}
    restored = pickler.loads(pickler.dumps(handler))  # what a worker unpickles
    assert restored.batch_elements_kwargs() == handler.batch_elements_kwargs()
    with pytest.raises(EngineError, match=r"--crop 224 does not fit .*\[.*16, 16, 3\]; pass --crop 16"):
        classify_images.check_setup(PipelineOptions(["--engine", "tensorrt", "--onnx_path", str(onnx_path)])
                                    .view_as(ClassifyOptions))


class MinBatchEngine(Engine):
    """ONNX Runtime behind a TensorRT-like refusal of batches below a profile min."""

    kind = "strict"

    def __init__(self, model, min_batch):
        self.inner = OnnxRuntimeEngine(model)
        self.min_batch = min_batch
        self.calls = []

    input_specs = property(lambda self: self.inner.input_specs)
    output_specs = property(lambda self: self.inner.output_specs)

    def infer(self, feed):
        n = len(next(iter(feed.values())))
        self.calls.append(n)
        if n < self.min_batch:
            raise EngineError(f"shape ({n}, ...) is outside every optimization profile")
        return self.inner.infer(feed)


def test_short_batches_are_padded_to_the_profile_min(no_tensorrt, tmp_path):
    TensorRTModelHandler = handler_class()

    handler = TensorRTModelHandler(onnx_path="m.onnx", build_options=BuildOptions(profiles=["4,8,16"]))
    engine = MinBatchEngine(image_classifier(), 4)
    batch = list(np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8))
    results = list(handler.run_inference(batch, engine))
    assert len(results) == 2 and engine.calls == [4]
    want = OnnxRuntimeEngine(image_classifier()).infer({"images": np.stack(batch)})["logits"]
    for i, result in enumerate(results):
        np.testing.assert_allclose(result.inference["logits"], want[i], rtol=1e-6, atol=1e-6)
    assert len(list(handler.run_inference(batch * 3, engine))) == 6 and engine.calls[-1] == 6


# -- the validate command with ONNX Runtime on both sides ---------------------------------

@pytest.fixture
def models(tmp_path):
    from engines.tensorrt.builder import convert_to_fp16

    paths = {}
    for name, data in {"ref": image_classifier(), "shifted": image_classifier(bias_shift=1.0),
                       "small": image_classifier(size=8)}.items():
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(data)
    try:
        paths["fp16"] = tmp_path / "fp16.onnx"
        paths["fp16"].write_bytes(convert_to_fp16(image_classifier()))
    except ImportError:
        paths.pop("fp16")
    return {k: str(v) for k, v in paths.items()}


def test_compare_reports_numbers_and_agreement(models):
    from engines.validate import compare, skimage_photos

    photos = skimage_photos()
    ref = OnnxRuntimeEngine(models["ref"])
    report = compare(OnnxRuntimeEngine(models["ref"]), ref, photos)
    assert report.ok and report.images == 11 and report.output == "logits"
    assert report.max_abs_logits == 0 and report.top1_agreement == 1.0
    bad = compare(OnnxRuntimeEngine(models["shifted"]), ref, photos)
    assert not bad.ok
    assert bad.max_abs_logits == pytest.approx(1.0, abs=1e-5)
    assert any(f.startswith("max |logits diff| 1 > 0.05") for f in bad.failures), bad.failures
    with pytest.raises(EngineError, match="The engines' inputs differ"):
        compare(OnnxRuntimeEngine(models["small"]), ref, photos)
    with pytest.raises(EngineError, match="No images to validate with"):
        compare(ref, ref, [])


def test_validate_command_exit_codes(models, capsys, tmp_path):
    from engines import validate

    ok = validate.main(["--engine", "onnxruntime", "--onnx_path", models["ref"], "--reference", models["ref"],
                        "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert ok == 0 and "11 images, output 'logits', fp32: max |logits diff| 0" in out and "OK" in out
    import json

    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["shifted"],
                          "--reference", models["ref"]]) == 1
    assert "FAILED: max |logits diff| 1 > 0.05" in capsys.readouterr().err
    # Looser numeric tolerances still fail it: its top-1 class differs on every photo.
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["shifted"], "--reference", models["ref"],
                          "--atol_logits", "1.5", "--atol_probs", "1"]) == 1
    assert "FAILED: top-1 agreement 0.0% < 90.0%" in capsys.readouterr().err
    # Looser, explicit tolerances on every count accept the same candidate.
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["shifted"], "--reference", models["ref"],
                          "--atol_logits", "1.5", "--atol_probs", "1", "--min_top1", "0"]) == 0
    assert validate.main(["--engine", "onnxruntime", "--engine_path", "x.plan", "--reference", models["ref"]]) == 2
    assert "--engine onnxruntime runs --onnx_path" in capsys.readouterr().err


def test_validate_fp16_model_with_fp16_tolerances(models, capsys):
    if "fp16" not in models:
        pytest.skip("onnxconverter-common is not installed")
    from engines import validate

    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["fp16"], "--reference", models["ref"]]) == 0
    assert ", fp16: max |logits diff|" in capsys.readouterr().out


def test_validate_on_real_jpegs(models, tmp_path, capsys):
    from PIL import Image

    from engines import validate

    paths = []
    for i, name in enumerate(("astronaut", "coffee")):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(__import__("skimage.data", fromlist=[name]), name)()).save(path, quality=90)
        paths.append(str(path))
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["ref"], "--reference", models["ref"],
                          "--images", *paths]) == 0
    assert "2 images" in capsys.readouterr().out


def test_validate_without_tensorrt_says_how_to_get_it(no_tensorrt, models, capsys, tmp_path):
    from engines import validate

    assert validate.main(["--onnx_path", models["ref"], "--reference", models["ref"]]) == 2
    assert "TensorRT is not importable" in capsys.readouterr().err


def test_validate_plan_without_sidecar_honours_fp16_and_says_so(tmp_path, monkeypatch, caplog):
    from engines import validate
    from engines.tensorrt.loader import TensorRTLoader

    monkeypatch.setattr(TensorRTLoader, "__call__", lambda self: "engine")  # no TensorRT here
    plan = tmp_path / "bare.plan"
    plan.write_bytes(b"ftrt" + bytes(60))
    base = ["--engine_path", str(plan), "--reference", "ref.onnx"]
    with caplog.at_level(logging.INFO, logger="engines.validate"):
        assert validate.make_candidate(validate.parse_args(base + ["--fp16"])) == ("engine", "fp16")
        assert validate.make_candidate(validate.parse_args(base)) == ("engine", "fp32")
    assert [r.getMessage() for r in caplog.records] == [
        f"no sidecar {plan}.json beside the plan: using fp16 tolerances (from --fp16)",
        f"no sidecar {plan}.json beside the plan: using fp32 tolerances (pass --fp16 or --precision fp16 for an "
        f"fp16 plan)"]
    write_sidecar(str(plan), PlanInfo(tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
                                      profiles=(Profile(1, 8, 16),), precision="fp16", onnx_sha256="0" * 64))
    assert validate.make_candidate(validate.parse_args(base)) == ("engine", "fp16")
