"""``pipelines/settings.py``: the command line is parsed, checked and resolved once, into frozen settings
that the reader, the model handler and the sinks read; no option is rewritten after parsing; each engine
adds its own flags through the registry, and the job module names no engine."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os

import pytest
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from pipelines import classify_images, engine_registry
from engines.base import UsageError
from pipelines.settings import BatchSettings, ClassifyOptions, DecodeSettings, resolve
from tests.conftest import REPO, jpeg_bytes, photo
from tests.tensorrt_models import image_classifier


def test_a_run_resolves_its_options_once_into_frozen_settings(corpus, model_path, tmp_path, monkeypatch):
    calls = []

    def counted(argv, **kwargs):
        calls.append(list(argv))
        return resolve(argv, **kwargs)

    monkeypatch.setattr(classify_images, "resolve", counted)
    directory, good, _ = corpus
    stats = classify_images.run(["--input", directory, "--output", str(tmp_path / "o"), "--batch_size", "5",
                                 "--progress_every_s", "0"])
    assert len(calls) == 1 and stats["predictions"] == len(good)
    assert stats["settings"]["batch_size"] == 5 and stats["settings"]["batches_per_call"] == 1
    settings, _ = resolve(calls[0], start_checks=False)
    for frozen, field in ((settings, "batch"), (settings, "input"), (settings.batch, "images_per_batch"),
                          (settings.decode, "mode")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, field, None)


@pytest.fixture
def fixed_batch_model(tmp_path):
    """A classifier of 16x16 images whose batch dimension is fixed at 1, and a folder with one photo."""
    path = tmp_path / "fixed.onnx"
    path.write_bytes(image_classifier(size=16, batch=1))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "chelsea.jpg").write_bytes(jpeg_bytes(photo("chelsea")))
    return str(path), str(photos)


def test_no_option_is_written_after_parsing(fixed_batch_model, tmp_path, monkeypatch):
    """The dated paths, a fixed-batch model's batch of 1 and the many-core local defaults all used to be
    written into the parsed options; now they are resolved into the settings and the job's options are
    built once with them."""
    model, photos = fixed_batch_model
    writes = []
    real = PipelineOptions.__setattr__

    def spy(self, name, value):
        if not name.startswith("_"):
            writes.append(name)
        real(self, name, value)

    monkeypatch.setattr(PipelineOptions, "__setattr__", spy)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    argv = ["--input", photos, "--output", str(tmp_path / "scored" / "dt={date}"), "--run_date", "2024-05-31",
            "--model", model, "--crop", "16", "--resize", "16", "--progress_every_s", "0"]
    settings, options = resolve(argv)
    assert writes == []
    assert settings.batch == BatchSettings(images_per_batch=1, batches_per_call=1, prefetch=2)  # the model's fixed batch
    assert settings.output == os.path.realpath(tmp_path / "scored" / "dt=2024-05-31")
    assert settings.local_defaults.startswith("16 cores: --direct_running_mode=multi_threading")
    assert settings.engine_record()["ort_sessions"] == 2 and settings.direct_num_workers == 2
    # The job's options carry the dated paths and the local defaults; --batch_size stays as typed.
    assert options.output == str(tmp_path / "scored" / "dt=2024-05-31") and options.batch_size is None
    assert options.view_as(DirectOptions).direct_running_mode == "multi_threading"
    # The options as typed, parsed again, are what they were.
    typed = ClassifyOptions(argv)
    assert typed.output.endswith("dt={date}") and typed.ort_sessions == 1


def test_batch_size_and_decode_reach_the_reader_the_handler_and_the_decoder_from_one_place(model_path):
    settings, _ = resolve(["--input", "x", "--output", "y", "--batch_size", "6", "--decode", "dali_cpu",
                           "--dali_threads", "2"], start_checks=False)
    assert settings.batch == BatchSettings(images_per_batch=6, batches_per_call=4, prefetch=8)
    assert settings.decode.mode == "dali_cpu" and settings.decode.encoded
    assert settings.decode.dali.max_batch == 6 and settings.decode.dali.device == "cpu"
    handler = classify_images.make_handler(settings)
    assert handler.images_per_batch == 6 and handler.batch_elements_kwargs()["max_batch_size"] == 4
    assert handler.loader.decoder == settings.decode.dali
    record = settings.record()
    assert (record["batch_size"], record["batches_per_call"], record["prefetch_batches"], record["decode"]) == (
        6, 4, 8, "dali_cpu")
    cpu, _ = resolve(["--input", "x", "--output", "y", "--decode", "cpu", "--prefetch", "3"], start_checks=False)
    assert cpu.batch == BatchSettings(images_per_batch=32, batches_per_call=1, prefetch=3)
    assert cpu.decode == DecodeSettings("cpu", "asked for", None, 1) and not cpu.decode.encoded


def _flags_added(add):
    parser = argparse.ArgumentParser()
    add(parser)
    return {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("name,flags", [
    ("onnxruntime", {"--model", "--providers", "--intra_op_threads", "--ort_sessions", "--ort_spinning"}),
    ("tensorrt", {"--engine_path", "--onnx_path", "--engine_cache", "--trt_profile", "--num_contexts",
                  "--cuda_graphs", "--workspace_gib", "--timing_cache", "--min_batch_size"}),
])
def test_each_engine_module_adds_its_own_flags_and_ranges(name, flags, monkeypatch):
    module = engine_registry._module(name)
    assert _flags_added(module.add_flags) - {"-h", "--help"} == flags
    assert {rule.flag for rule in module.FLAG_RANGES} <= flags  # each engine checks only its own flags
    # Without the engine in the registry, the command line does not know its flags.
    monkeypatch.setattr(engine_registry, "ENGINES", {n: m for n, m in engine_registry.ENGINES.items() if n != name})
    assert not flags & _flags_added(ClassifyOptions._add_argparse_args)


def test_precision_is_every_engines_flag_each_with_its_own_default():
    assert "--precision" in _flags_added(engine_registry.add_flags)
    for name in engine_registry.ENGINES:
        assert "--precision" not in _flags_added(engine_registry._module(name).add_flags)
        assert engine_registry._module(name).DEFAULT_PRECISION in ("fp32", "fp16")


def test_the_job_module_names_no_engine():
    source = (REPO / "pipelines" / "classify_images.py").read_text()
    assert "onnxruntime" not in source.lower() and "tensorrt" not in source.lower()
    for path in ("classify_images.py", "settings.py"):
        tree = ast.parse((REPO / "pipelines" / path).read_text())
        compared = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Compare)
                    and any(isinstance(side, ast.Attribute) and side.attr == "engine"
                            for side in [node.left, *node.comparators])]
        assert not compared, f"{path} branches on --engine: {compared}"



def test_a_non_square_crop_sizes_the_decoder_and_the_memory_a_batch_needs(tmp_path, monkeypatch):
    """A 240 x 320 (height x width) preprocessing, put in place of the flags' here: the model check
    passes for a 240 x 320 model, the DALI decoder crops 240 x 320, and the batch that must fit in
    memory is counted in 240 x 320 x 3 byte images."""
    import onnx

    from images.pillow_decoder import PreprocessConfig
    from pipelines import settings as settings_module

    model = onnx.load_from_string(image_classifier(size=16))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value = 240, 320
    path = tmp_path / "wide.onnx"
    path.write_bytes(model.SerializeToString())
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "chelsea.jpg").write_bytes(jpeg_bytes(photo("chelsea")))
    wide = PreprocessConfig(resize=320, crop=240, crop_width=320)
    monkeypatch.setattr(settings_module, "preprocess_config", lambda options, *model: wide)
    asked = []
    real_fit = engine_registry.fit_batch

    def fit(options, batch_size, **kwargs):
        asked.append(kwargs["image_bytes"])
        return real_fit(options, batch_size, **kwargs)

    monkeypatch.setattr(engine_registry, "fit_batch", fit)
    settings, _ = resolve(["--input", str(photos), "--output", str(tmp_path / "out"), "--model", str(path),
                           "--decode", "dali_cpu", "--progress_every_s", "0"])
    assert settings.preprocess.crop_size == (240, 320)
    assert settings.decode.dali.crop_size == (240, 320) and settings.decode.dali.resize == 320
    assert asked == [240 * 320 * 3]


def test_keep_columns_is_resolved_once_from_the_manifest_into_the_settings(model_path, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "chelsea.jpg").write_bytes(jpeg_bytes(photo("chelsea")))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"uri,id,sku,run_date\n{photos / 'chelsea.jpg'},1,A-1,2024-05-30\n")
    argv = ["--input", str(manifest), "--output", str(tmp_path / "o")]

    def kept(*flags, start_checks=True):
        settings, _ = resolve(argv + list(flags), start_checks=start_checks)
        assert settings.record()["keep_columns"] == list(settings.keep_columns)
        return settings.keep_columns

    assert kept() == ("sku", "run_date")  # default: all of the manifest's columns besides uri and id
    assert kept("--keep_columns", "run_date") == ("run_date",)
    assert kept("--keep_columns", "") == ()
    with pytest.raises(UsageError, match=r"--keep_columns sku,nope: manifest .*list\.csv has no column 'nope'; its "
                                         r"columns \(besides uri and id\): sku, run_date"):
        kept("--keep_columns", "sku,nope")
    # Without the start checks the manifest is not read: the flag as given, or none.
    assert kept("--keep_columns", " sku, nope", start_checks=False) == ("sku", "nope")
    assert kept(start_checks=False) == ()
    # A BigQuery row carries run_date: the manifest's column of that name would collide with it.
    with pytest.raises(UsageError, match=r"its column 'run_date' has the name of a field the job writes \(.*run_date"
                                         r"\); rename it in the manifest, or leave it out with --keep_columns "
                                         r"\(e\.g\. --keep_columns sku\)"):
        kept("--output_table", "my-project:scoring.predictions", "--temp_location", "gs://my-bucket/tmp")


@pytest.mark.parametrize("flags, here", [
    ([], True),
    (["--direct_running_mode", "multi_threading", "--direct_num_workers", "4"], True),
    (["--runner", "DirectRunner", "--direct_running_mode", "in_memory"], True),
    (["--direct_running_mode", "multi_processing", "--direct_num_workers", "4"], False),
    (["--direct_running_mode", "multi_threading", "--share_model_across_processes"], False),
    (["--runner", "PrismRunner"], False),
    (["--runner", "DataflowRunner", "--project", "p", "--region", "r", "--temp_location", "gs://b/t"], False),
])
def test_the_model_is_preloaded_only_where_the_workers_run_in_this_process(model_path, flags, here):
    """A preload in the launcher of workers in other processes would hold a model copy nobody uses."""
    settings, _ = resolve(["--input", "x", "--output", "y", *flags], start_checks=False)
    assert settings.workers_in_process is here


def test_a_local_job_takes_the_model_it_preloaded_and_loads_no_other(corpus, tmp_path, caplog):
    directory, good, _ = corpus
    with caplog.at_level("INFO"):
        stats = classify_images.run(["--input", directory, "--output", str(tmp_path / "o"), "--batch_size", "4",
                                     "--progress_every_s", "0", "--direct_running_mode", "multi_threading",
                                     "--direct_num_workers", "2"])
    assert stats["predictions"] == len(good)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("preloaded the model" in m for m in messages) == 1
    assert sum("took the model preloaded" in m for m in messages) == 1
    assert sum(m.startswith("onnxruntime engine loaded") for m in messages) == 1, "the job loaded a second model"


@pytest.mark.parametrize("flags,ahead", [([], True), (["--no_score_ahead"], False),
                                         (["--share_model_across_processes"], False)])
def test_scoring_ahead_is_decided_once_off_with_its_flag_or_a_model_in_another_process(flags, ahead):
    settings, _ = resolve(["--input", "x", "--output", "y", *flags], start_checks=False)
    assert settings.batch.score_ahead is ahead and settings.record()["score_ahead"] is ahead


@pytest.mark.parametrize("flags,cores,threads", [
    ((), 16, 16),
    ((), 32, 16),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=2"), 16, 8),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=4"), 16, 4),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=2"), 32, 16),  # the cores are shared, not 16
    (("--direct_running_mode=multi_processing", "--direct_num_workers=8"), 128, 16),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=4"), 2, 1),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=0"), 8, 1),  # Beam: one process per core
    (("--direct_running_mode=multi_processing", "--direct_num_workers=2", "--dali_threads=12"), 16, 12),
    (("--direct_running_mode=multi_threading", "--direct_num_workers=4"), 32, 16),  # threads share one decoder
    # One shared copy, so one decoder, whatever the processes; two copies share the cores.
    (("--direct_running_mode=multi_processing", "--direct_num_workers=4", "--share_model_across_processes"), 16, 16),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=4", "--share_model_across_processes",
      "--model_copies=2"), 16, 8),
    # Workers elsewhere: each decoder takes its own machine's cores where it is built, not the launcher's.
    (("--runner=DataflowRunner",), 2, 0),
    (("--direct_running_mode=multi_processing", "--direct_num_workers=2", "--runner=DataflowRunner"), 16, 0),
    (("--runner=DataflowRunner", "--dali_threads=6"), 2, 6),
])
def test_dali_threads_default_to_the_cores_shared_among_a_local_runs_sdk_processes(flags, cores, threads,
                                                                                    monkeypatch):
    from pipelines.settings import dali_threads, is_local

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    options = ClassifyOptions(["--input", "x", "--output", "y", *flags])
    assert dali_threads(options, is_local(options)) == threads


def test_each_sdk_process_of_a_local_run_builds_its_decoder_with_its_share_of_the_cores(model_path, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    flags = ["--input", "x", "--output", "y", "--decode", "dali_cpu", "--direct_running_mode", "multi_processing",
             "--direct_num_workers", "4"]
    settings, _ = resolve(flags, start_checks=False)
    assert settings.decode.dali.threads == 4 and settings.engine_record()["dali_threads"] == 4
    settings, _ = resolve(flags + ["--dali_threads", "16"], start_checks=False)
    assert settings.decode.dali.threads == 16
    # Dataflow: the workers' decoders take their own machines' cores, and stats.json says so.
    settings, _ = resolve(["--input", "gs://b/in/*.jpg", "--output", "gs://b/out", "--decode", "gpu", "--providers",
                           "cuda", "--runner", "DataflowRunner", "--project", "p", "--region", "r",
                           "--temp_location", "gs://b/t"], start_checks=False)
    assert settings.decode.dali.threads == 0
    assert settings.engine_record()["dali_threads"] == "each worker's cores, at most 16"
