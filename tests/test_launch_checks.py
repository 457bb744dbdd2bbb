"""pipelines/launch_checks.py: what a submission to a remote runner (Dataflow) must get right before
anything is built or staged, checked at start with exit 2 and a message naming the flag and the fix.

The worker image's versions (pipelines/image_versions.txt): Google's custom-container docs ask the
launch environment for the same Apache Beam and Python versions as the image
(https://cloud.google.com/dataflow/docs/guides/run-custom-container: "use an Apache Beam SDK version
and language version that match the SDK on your custom container image"); the pipeline is pickled at
launch and unpickled on the workers.
"""

from __future__ import annotations

import sys

import apache_beam
import pytest

from engines.base import UsageError
from pipelines import classify_images, launch_checks, settings
from pipelines.launch_checks import ImageVersions

#: Beam's options for a Dataflow submission; every path is in a bucket, so only the check under test can refuse.
DATAFLOW = ["--runner", "DataflowRunner", "--project", "test-project", "--region", "us-central1",
            "--temp_location", "gs://some-bucket/tmp"]
REMOTE_PATHS = ["--input", "gs://some-bucket/photos/*.jpg", "--output", "gs://some-bucket/scored",
                "--model", "gs://some-bucket/models/m.onnx"]


# -- the worker image's versions --------------------------------------------------------------------

def test_the_image_versions_are_read_from_the_one_file():
    image = launch_checks.image_versions()
    assert image == ImageVersions(python="3.12", beam="2.77.0")


def test_launcher_versions_are_this_interpreters():
    here = launch_checks.launcher_versions()
    assert here == ImageVersions(python=f"{sys.version_info[0]}.{sys.version_info[1]}", beam=apache_beam.__version__)


@pytest.mark.parametrize("launcher, named", [
    (ImageVersions("3.11", "2.77.0"), r"Python 3\.11 .* the worker image has Python 3\.12"),
    (ImageVersions("3.12", "2.76.0"), r"apache-beam 2\.76\.0, but the worker image has .*apache-beam 2\.77\.0"),
])
def test_a_launcher_that_differs_from_the_image_is_refused_naming_both(launcher, named):
    image = ImageVersions("3.12", "2.77.0")
    with pytest.raises(UsageError, match=named + r".*pipelines/image_versions\.txt.*--allow_version_mismatch"):
        launch_checks.check_versions(image, launcher, allowed=False)
    launch_checks.check_versions(image, launcher, allowed=True)  # another image, matching this launcher
    launch_checks.check_versions(image, image, allowed=False)


def _mismatch_here():
    image, here = launch_checks.image_versions(), launch_checks.launcher_versions()
    return None if image == here else (image, here)


@pytest.mark.skipif(_mismatch_here() is None, reason="this interpreter has the image's Python and Beam")
def test_a_dataflow_submission_from_another_python_stops_at_start_with_exit_2(capsys):
    image, here = _mismatch_here()
    with pytest.raises(UsageError, match=rf"Python {here.python} and apache-beam {here.beam}"):
        classify_images.run(DATAFLOW + REMOTE_PATHS)
    assert classify_images.main(DATAFLOW + REMOTE_PATHS) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--allow_version_mismatch" in err, err


def test_local_runs_are_not_held_to_the_image_versions(tmp_path, model_path, corpus):
    # The DirectRunner runs here, with this interpreter: there is no image to match.
    out = tmp_path / "out"
    stats = classify_images.run(["--input", corpus[1][0], "--output", str(out), "--progress_every_s", "0",
                                 "--model", model_path])
    assert stats["predictions"] == 1


# -- paths the workers read or write ----------------------------------------------------------------

def _options(*flags):
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions([*DATAFLOW, "--allow_version_mismatch", *flags])
    return options, options.view_as(settings.ClassifyOptions)


def _check(*flags):
    options, opts = _options(*flags)
    launch_checks.check_launch(options, opts, settings.is_local(options))


GS = {"--input": "gs://some-bucket/photos/*.jpg", "--output": "gs://some-bucket/scored",
      "--model": "gs://some-bucket/models/m.onnx"}


def _flags(**overrides):
    values = {**GS, **{f"--{k}": v for k, v in overrides.items()}}
    return [x for flag, value in values.items() if value is not None for x in (flag, value)]


def test_paths_in_buckets_pass():
    _check(*_flags())
    _check(*_flags(model=None), "--engine", "tensorrt", "--onnx_path", "gs://b/m.onnx", "--engine_cache",
           "gs://b/plans", "--timing_cache", "gs://b/timing.cache")
    _check(*_flags(model=None), "--engine", "tensorrt", "--engine_path", "gs://b/m.plan")


@pytest.mark.parametrize("flags, named", [
    (_flags(model=None), r"--model is not given, so the workers would read the prepared model on this machine's "
                         r"disk .*gsutil cp .*--model gs://"),
    (_flags(model="/data/models/m.onnx"), r"--model /data/models/m\.onnx is on this machine's disk.*gsutil cp "
                                          r"/data/models/m\.onnx gs://BUCKET/"),
    (_flags(model="file:///data/m.onnx"), r"--model file:///data/m\.onnx is on this machine's disk"),
    (_flags(input="/data/photos/*.jpg"), r"--input /data/photos/\*\.jpg is on this machine's disk"),
    (_flags(output="/data/scored"), r"--output /data/scored is on this machine's disk.*workers write it.*gs://"),
    (_flags() + ["--skip_scored", "/data/scored"], r"--skip_scored /data/scored is on this machine's disk"),
    (_flags(model=None) + ["--engine", "tensorrt", "--engine_path", "models/m.plan"],
     r"--engine_path models/m\.plan is on this machine's disk"),
    (_flags(model=None) + ["--engine", "tensorrt", "--onnx_path", "m.onnx"], r"--onnx_path m\.onnx is on"),
    (_flags(model=None) + ["--engine", "tensorrt", "--onnx_path", "gs://b/m.onnx", "--engine_cache", "/tmp/plans"],
     r"--engine_cache /tmp/plans is on this machine's disk.*workers write it"),
    (_flags(model=None) + ["--engine", "tensorrt", "--onnx_path", "gs://b/m.onnx", "--timing_cache", "t.cache"],
     r"--timing_cache t\.cache is on this machine's disk"),
], ids=["default-model", "model", "file-url", "input", "output", "skip_scored", "engine_path", "onnx_path",
        "engine_cache", "timing_cache"])
def test_a_path_on_the_launching_machine_is_refused_for_a_remote_runner(flags, named):
    with pytest.raises(UsageError, match=named + r".*(DataflowRunner|Dataflow)"):
        _check(*flags)


def test_a_local_path_reaches_main_as_one_line_and_exit_2(capsys):
    assert classify_images.main(DATAFLOW + ["--allow_version_mismatch", *_flags(model="/data/m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model /data/m.onnx is on this machine's disk") and "\n" not in err, err


def test_labels_are_read_at_launch_so_a_local_labels_file_is_fine(tmp_path):
    # read_labels runs in the launcher and the names travel inside the pipeline (PredictionRows), so
    # the workers never open --labels_file.
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    _check(*_flags(), "--labels_file", str(labels))


def test_model_files_in_the_worker_image_may_be_named_by_path_from_a_launch_inside_it(tmp_path, monkeypatch):
    # The Flex Template launcher runs in the worker image: a model file baked into that image is
    # there for the workers too. Outputs and caches never are (each worker has its own disk).
    model = tmp_path / "in-image.onnx"
    model.write_bytes(b"onnx")
    monkeypatch.setenv(launch_checks.IN_IMAGE_VARIABLE, "1")
    _check(*_flags(model=str(model)))
    with pytest.raises(UsageError, match=r"--model /nonexistent\.onnx is on this machine's disk"):
        _check(*_flags(model="/nonexistent.onnx"))
    with pytest.raises(UsageError, match=r"--output /data/out is on this machine's disk"):
        _check(*_flags(output="/data/out"))
    monkeypatch.delenv(launch_checks.IN_IMAGE_VARIABLE)
    with pytest.raises(UsageError, match=r"--model .*in-image\.onnx is on this machine's disk"):
        _check(*_flags(model=str(model)))


def test_local_runners_read_local_paths():
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(["--runner", "DirectRunner", "--input", "/data/x", "--output", "/data/y"])
    launch_checks.check_launch(options, options.view_as(settings.ClassifyOptions), True)


# -- the engine's own setup (ONNX Runtime providers) ------------------------------------------------

def _has_cuda_provider():
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_has_cuda_provider(), reason="this onnxruntime has the CUDA provider (onnxruntime-gpu)")
def test_providers_cuda_without_the_cuda_provider_stops_before_the_pipeline_in_one_line(tmp_path, corpus, capsys):
    """Before: the job started, every worker's load_model failed, and a 40-line traceback ended the run."""
    out = tmp_path / "out"
    argv = ["--input", corpus[1][0], "--output", str(out), "--providers", "cuda", "--progress_every_s", "0"]
    with pytest.raises(UsageError, match=r"^--providers cuda: this onnxruntime \(.*\) has no CUDAExecutionProvider "
                                         r"\(it has .*CPUExecutionProvider.*\): install onnxruntime-gpu .* or pass "
                                         r"--providers cpu$"):
        classify_images.run(argv)
    assert classify_images.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --providers cuda: ") and err.count("\n") == 1, err
    assert not out.exists()  # stopped before anything was built or written


def test_unknown_provider_names_are_refused_for_any_runner(tmp_path):
    with pytest.raises(UsageError, match=r"--providers cuad: 'cuad' is not an ONNX Runtime execution provider; use "
                                         r"cpu, cuda, tensorrt"):
        classify_images.run(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--providers", "cuad"])
    with pytest.raises(UsageError, match=r"--providers cpu,cuad: 'cuad' is not"):
        _check(*_flags(), "--providers", "cpu,cuad")


def test_a_remote_runner_leaves_the_providers_to_the_worker_image():
    # The workers' onnxruntime is the image's (onnxruntime-gpu), not this machine's.
    _check(*_flags(), "--providers", "cuda,cpu")
    _check(*_flags(), "--providers", "TensorrtExecutionProvider,CUDAExecutionProvider")


@pytest.mark.parametrize("flags, where", [
    ([], "image"),  # Dataflow
    (["--runner", "PortableRunner", "--job_endpoint", "localhost:1"], "image"),  # DOCKER by default
    (["--runner", "PortableRunner", "--environment_type", "PROCESS", "--environment_config", "{}"], "this machine"),
    (["--runner", "PortableRunner", "--environment_type", "LOOPBACK"], "this machine"),
    (["--runner", "PortableRunner", "--environment_type", "EXTERNAL", "--environment_config", "localhost:5"],
     "this machine"),
    (["--runner", "PortableRunner", "--environment_type", "EXTERNAL", "--environment_config", "pool.internal:5"],
     "elsewhere"),
])
def test_where_the_workers_run_decides_which_checks_hold(flags, where):
    from apache_beam.options.pipeline_options import PipelineOptions

    assert launch_checks.workers_environment(PipelineOptions([*DATAFLOW, *flags])) == where


def test_a_worker_pool_on_another_host_cannot_read_local_paths_but_keeps_its_own_python(monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    other = launch_checks.ImageVersions(python="2.7", beam="0.1.0")  # no launcher matches this image
    monkeypatch.setattr(launch_checks, "image_versions", lambda: other)
    pool = ["--runner", "PortableRunner", "--environment_type", "EXTERNAL", "--environment_config", "pool.internal:5"]
    options = PipelineOptions([*DATAFLOW, *pool, *_flags()])
    launch_checks.check_launch(options, options.view_as(settings.ClassifyOptions), False)
    with pytest.raises(UsageError, match="apache-beam 0.1.0"):  # the same launch to Dataflow is held to the image
        options = PipelineOptions([*DATAFLOW, *_flags()])
        launch_checks.check_launch(options, options.view_as(settings.ClassifyOptions), False)
    options, opts = _options(*pool, *_flags(model="/tmp/m.onnx"))
    with pytest.raises(UsageError, match="--model"):
        launch_checks.check_launch(options, opts, False)
