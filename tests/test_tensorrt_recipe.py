"""``--engine tensorrt`` builds, pickles and submits its job with no TensorRT or CUDA installed: the
batch size comes from the plan's sidecar or the build flags, and the loader is a small recipe."""

from __future__ import annotations

import logging
import pickle

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from engines.base import EngineError, UsageError
from engines.tensorrt.options import Profile
from engines.tensorrt.plan import PlanInfo, write_sidecar
from engines.tensorrt.recipe import choose_batch_sizes, cli_on_gpu, cli_recipe
from pipelines.settings import ClassifyOptions
from tests.tensorrt_models import LABELS, image_classifier


@pytest.fixture
def plan_path(tmp_path):
    path = tmp_path / "model.plan"
    path.write_bytes(b"ftrt" + bytes(20) + bytes([10, 11, 0, 33]) + bytes(36))
    write_sidecar(str(path), PlanInfo(
        tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
        profiles=(Profile(1, 8, 16), Profile(17, 128, 256)), precision="fp16", onnx_sha256="0" * 64,
        labels=tuple(LABELS)))
    return str(path)


def options(*flags):
    return PipelineOptions(["--input", "x", "--output", "y", "--engine", "tensorrt", *flags]).view_as(ClassifyOptions)


def recipe_of(opts):
    """The recipe for the flags as given (``--batch_size`` as typed, as ``pipelines.settings.resolve`` passes it)."""
    return cli_recipe(opts, opts.batch_size)


def test_a_plan_gets_the_largest_profile_max_and_its_sidecar_labels(no_tensorrt, plan_path):
    opts = options("--engine_path", plan_path)
    recipe = recipe_of(opts)
    assert recipe.batch_size == 256 and cli_on_gpu(opts) and recipe.labels == LABELS
    assert recipe.info["precision"] == "fp16" and recipe.info["built_on"] == "NVIDIA L4 (compute 8.9)"
    assert recipe.info["profiles"] == [{"min": 1, "opt": 8, "max": 16}, {"min": 17, "opt": 128, "max": 256}]
    clone = pickle.loads(pickle.dumps(recipe.loader))  # what a worker unpickles
    assert clone == recipe.loader and clone.engine_path == plan_path and clone.device == "auto"


def test_explicit_batch_size_and_copies_per_gpu(no_tensorrt, plan_path):
    recipe = recipe_of(options("--engine_path", plan_path, "--batch_size", "512", "--share_model_across_processes",
                                "--model_copies", "2"))
    assert recipe.batch_size == 512 and recipe.loader.device == "auto"
    assert "batches above 256 are split" in recipe.info["batch_choice"]


def test_onnx_path_builds_the_profile_from_the_flags(no_tensorrt):
    recipe = recipe_of(options("--onnx_path", "gs://b/m.onnx", "--engine_cache", "gs://b/plans", "--precision",
                                "fp16", "--batch_size", "48"))
    assert recipe.batch_size == 48 and recipe.labels is None and recipe.labels_model == "gs://b/m.onnx"
    assert recipe.loader.build_options.profiles == (Profile(1, 48, 48),)
    assert recipe.loader.build_options.precision == "fp16" and recipe.loader.engine_cache == "gs://b/plans"
    recipe = recipe_of(options("--onnx_path", "m.onnx", "--trt_profile", "4,32,64"))
    assert recipe.batch_size == 64 and recipe.loader.build_options.profiles == (Profile(4, 32, 64),)


def test_a_plan_without_sidecar_needs_batch_size(no_tensorrt, tmp_path):
    plan = str(tmp_path / "bare.plan")
    with pytest.raises(UsageError, match=r"No sidecar .*bare.plan.json beside the plan.*or pass --batch_size"):
        recipe_of(options("--engine_path", plan))
    assert recipe_of(options("--engine_path", plan, "--batch_size", "64")).batch_size == 64
    with pytest.raises(UsageError, match="needs --engine_path PLAN .* or --onnx_path"):
        recipe_of(options())


def test_choose_batch_sizes_refuses_what_no_profile_takes():
    assert choose_batch_sizes([Profile(1, 8, 16)])[:2] == (8, 16)
    assert "padded" in choose_batch_sizes([Profile(4, 8, 16)])[2]
    with pytest.raises(EngineError, match="no optimisation profiles"):
        choose_batch_sizes([])
    with pytest.raises(EngineError, match="min_batch_size <= max_batch_size"):
        choose_batch_sizes([Profile(1, 8, 16)], min_batch_size=32, max_batch_size=16)


def test_loading_without_tensorrt_fails_with_the_fix(no_tensorrt, plan_path):
    with pytest.raises(ImportError, match=r"TensorRT is not importable .*Use the image built from Dockerfile"):
        recipe_of(options("--engine_path", plan_path)).loader()


def test_build_flags_with_a_built_plan_are_reported_as_ignored(no_tensorrt, plan_path, caplog):
    def warned(*flags):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="engines.tensorrt.recipe"):
            recipe_of(options("--engine_path", plan_path, *flags))
        return " ".join(r.getMessage() for r in caplog.records)

    assert warned() == ""  # the default --precision fp16 matches the fp16 plan
    message = warned("--trt_profile", "1,4,8", "--workspace_gib", "2", "--precision", "fp32")
    for flag in ("--trt_profile", "--workspace_gib", "--precision fp32 (the plan is fp16)"):
        assert flag in message


def test_num_contexts_is_the_runtimes_choice_not_the_plans(no_tensorrt):
    """Contexts share the plan's profiles (TensorRT 10.x/11.x): any number of contexts runs one plan,
    and changing --num_contexts neither rebuilds the plan nor changes its engine-cache key."""
    one = recipe_of(options("--onnx_path", "m.onnx", "--num_contexts", "1")).loader
    four = recipe_of(options("--onnx_path", "m.onnx", "--num_contexts", "4")).loader
    assert four.num_contexts == 4
    assert one.build_options.cache_key() == four.build_options.cache_key()


@pytest.mark.parametrize("source", ["engine_path", "onnx_path"])
def test_classify_images_job_with_engine_tensorrt_builds_and_serializes(no_tensorrt, plan_path, tmp_path, source):
    """The whole CLI job graph with --engine tensorrt, as submitted to a runner, with no TensorRT here."""
    import apache_beam as beam
    from apache_beam.internal import pickler

    from pipelines import classify_images
    from pipelines.settings import resolve

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8")
    onnx_path = tmp_path / "tiny.onnx"
    onnx_path.write_bytes(image_classifier())
    model_flags = (["--engine_path", plan_path] if source == "engine_path" else
                   ["--onnx_path", str(onnx_path), "--engine_cache", str(tmp_path / "cache"), "--trt_profile", "1,8,16"])
    argv = ["--input", str(images), "--output", str(tmp_path / "out"), "--engine", "tensorrt", "--crop", "16",
            "--resize", "16", *model_flags]
    settings, pipeline_options = resolve(argv)  # with the start checks: the ONNX model's input fits --crop 16
    handler = classify_images.make_handler(settings)
    assert settings.engine_record()["engine"] == "tensorrt" and list(settings.labels) == LABELS
    assert handler.images_per_batch == settings.batch.images_per_batch == (256 if source == "engine_path" else 16)
    pipeline = beam.Pipeline(options=pipeline_options)
    classify_images.build_pipeline(pipeline, settings)
    proto = pipeline.to_runner_api()
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"FindImages", "ReadBatches", "RunInference", "Rows"} <= {n.split("/")[0] for n in names}
    restored = pickler.loads(pickler.dumps(handler))  # what a worker unpickles
    assert restored.loader == handler.loader and restored.images_per_batch == handler.images_per_batch
    with pytest.raises(UsageError, match=r"--crop 224 does not fit the model: it takes 16 x 16 images .*; pass "
                                         r"--crop 16"):
        resolve(["--input", str(images), "--output", str(tmp_path / "out"), "--engine", "tensorrt", "--onnx_path",
                 str(onnx_path), "--crop", "224"])
    followed, _ = resolve(["--input", str(images), "--output", str(tmp_path / "out"), "--engine", "tensorrt",
                           "--onnx_path", str(onnx_path)])
    assert (followed.preprocess.crop, followed.preprocess.resize) == (16, 19)  # the model's size; 16 x 256/224


def test_a_plans_sidecar_tells_the_job_its_input_outputs_conversion_and_activations(no_tensorrt, tmp_path):
    """A plan has no graph to read: the build records what the job needs of the model it was built from."""
    import json

    from engines.model_adapter import INPUT_ADAPTER_KEY, Preprocessing, wrap
    from engines.tensorrt.builder import _activations
    from engines.tensorrt.recipe import cli_built_model
    from tests import model_variants

    prepared = wrap(model_variants.softmax_ended(model_variants.load_float_model()),
                    Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    activations, ends = _activations(prepared.SerializeToString())
    assert (activations, ends) == ({"probs": "none"}, {"probs": "softmax"})
    path = tmp_path / "m.plan"
    path.write_bytes(b"ftrt" + bytes(60))
    meta = {p.key: p.value for p in prepared.metadata_props}
    write_sidecar(str(path), PlanInfo(
        tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9", profiles=(Profile(1, 8, 16),),
        precision="fp16", onnx_sha256="0" * 64,
        extra={"inputs": [{"name": "images", "onnx_type": "UINT8", "dims": [-1, 224, 224, 3]}],
               "outputs": [{"name": "probs", "onnx_type": "FLOAT", "dims": [-1, 1000]}], "onnx_metadata": meta,
               "activations": activations, "final_activations": ends, "plan_sha256": "c" * 64}))
    built = cli_built_model(options("--engine_path", str(path)))
    assert built.inputs == (("images", "UINT8", (-1, 224, 224, 3)),) and built.outputs[0][0] == "probs"
    assert built.preprocessing == Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert json.loads(meta[INPUT_ADAPTER_KEY])["channel_order"] == "rgb"
    assert (built.activations, built.final_activations, built.sha256) == ({"probs": "none"}, {"probs": "softmax"},
                                                                          "c" * 64)
    assert cli_built_model(options("--onnx_path", "m.onnx")) is None
    (tmp_path / "bare.plan").write_bytes(b"ftrt" + bytes(60))
    assert cli_built_model(options("--engine_path", str(tmp_path / "bare.plan"))).outputs == ()
