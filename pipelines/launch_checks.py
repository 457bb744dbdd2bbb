"""Checks at launch for what would otherwise fail on the workers, long after submission.

Called once from ``pipelines.settings.resolve`` before anything is built or staged; each failure
names the flag and the fix and stops the command with exit status 2 (a
:class:`~engines.base.UsageError`, or an :class:`~engines.base.EngineError` for a model this
pipeline cannot feed).

For every runner, the inputs and outputs themselves: ``--input`` matches something readable
(:func:`check_input`), the model takes what the preprocessing makes and has ``--output_name``
(:func:`check_model`), and ``--output`` can take this run's results (:func:`check_output`).

For a remote runner (Dataflow; anything but the DirectRunner and Prism) whose workers do not run on
this machine (a portable runner's LOOPBACK or PROCESS workers, or an EXTERNAL pool on localhost, do;
:func:`workers_environment`):

* **Versions** (workers that run the image). The launching interpreter's Python major.minor and Apache Beam must equal the
  worker image's (:data:`IMAGE_VERSIONS_FILE`, the one place they are set; the Dockerfile builds
  from it). Google's custom-container docs: "use an Apache Beam SDK version and language version
  that match the SDK on your custom container image"
  (https://cloud.google.com/dataflow/docs/guides/run-custom-container); the pipeline is pickled
  here and unpickled there. ``--allow_version_mismatch`` skips this for another image built for
  the launching environment.
* **Paths.** Every file or folder the workers open (``--input``, ``--output``, ``--skip_scored`` and
  the engine's own, :func:`pipelines.engine_registry.worker_paths`: ``--model``, ``--engine_path``,
  ``--onnx_path``, ``--engine_cache``, ``--timing_cache``) must be where the workers can reach it,
  not on the launching machine's disk (``.dockerignore`` keeps ``models/`` out of the image, so not
  even the default model is there). One exception: files the workers only read (a model, a
  manifest) that a launch *inside the worker image* names by path (the Flex Template launcher runs
  in it, see :data:`IN_IMAGE_VARIABLE`) are in the image the workers run too. ``--labels_file`` is read at launch and its names travel inside the
  pipeline, so it may stay local.

For every runner, the engine's own checks (:func:`pipelines.engine_registry.check`), e.g. ONNX Runtime
refuses ``--providers`` names that are no provider, and locally a provider this machine's
onnxruntime lacks (the remote workers run the image's onnxruntime-gpu instead).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List

from apache_beam.options.pipeline_options import StandardOptions

from engines import storage
from engines.base import EngineError, UsageError, WorkerPath
from engines.flags import ModelFile

_LOG = logging.getLogger(__name__)

#: The worker image's Python and Beam versions (KEY=VALUE lines; '#' starts a comment).
IMAGE_VERSIONS_FILE = Path(__file__).resolve().with_name("image_versions.txt")
#: Set (to 1) by the Dockerfile in the worker image: a launch in it (the Flex Template launcher) runs
#: in the image the workers run, so a model file it names by path is there for them too.
IN_IMAGE_VARIABLE = "BEAM_TENSORRT_WORKER_IMAGE"


@dataclasses.dataclass(frozen=True)
class ImageVersions:
    """Python (major.minor) and Apache Beam versions of an environment.

    Attributes:
        python: e.g. "3.12".
        beam: e.g. "2.77.0".
    """

    python: str
    beam: str

    def describe(self) -> str:
        return f"Python {self.python} and apache-beam {self.beam}"


def _read_pins(path: Path) -> Dict[str, str]:
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, sep, value = line.partition("=")
            if not sep:
                raise EngineError(f"{path}: {line!r} is not KEY=VALUE")
            pins[key.strip()] = value.strip()
    return pins


def image_versions(path: Path = IMAGE_VERSIONS_FILE) -> ImageVersions:
    """The worker image's versions, from :data:`IMAGE_VERSIONS_FILE`.

    Raises:
        EngineError: the file is missing or lacks PYTHON_VERSION or BEAM_VERSION (a broken install).
    """
    try:
        pins = _read_pins(path)
        return ImageVersions(python=pins["PYTHON_VERSION"], beam=pins["BEAM_VERSION"])
    except (OSError, KeyError) as e:
        raise EngineError(f"Cannot read the worker image's versions from {path} ({e!r}); reinstall the project "
                          f"(pip install -e .), which ships that file") from None


def launcher_versions() -> ImageVersions:
    """This interpreter's Python major.minor and the Apache Beam it imports."""
    import apache_beam

    return ImageVersions(python=f"{sys.version_info[0]}.{sys.version_info[1]}", beam=apache_beam.__version__)


def check_versions(image: ImageVersions, launcher: ImageVersions, allowed: bool) -> None:
    """Refuses a launch whose Python or Beam differs from the worker image's.

    Args:
        image: The worker image's versions (:func:`image_versions`).
        launcher: This environment's (:func:`launcher_versions`).
        allowed: ``--allow_version_mismatch`` was passed.

    Raises:
        UsageError: naming both sets of versions, the file and the two fixes.
    """
    if allowed or image == launcher:
        return
    raise UsageError(f"this launch uses {launcher.describe()}, but the worker image has {image.describe()} "
                     f"({IMAGE_VERSIONS_FILE.parent.name}/{IMAGE_VERSIONS_FILE.name}, what the Dockerfile builds): "
                     f"the pipeline is pickled here and unpickled on the workers, and Dataflow asks for the image's "
                     f"Beam and Python at launch. Launch from Python {image.python} with apache-beam=={image.beam} "
                     f"(e.g. inside the image), or pass --allow_version_mismatch when --sdk_container_image is "
                     f"another image built for this environment")


def _is_local_path(path: str) -> bool:
    return not storage.is_url(path) or path.startswith("file://")


def _upload(path: str) -> str:
    """The gsutil command that puts ``path`` in a bucket."""
    local = path[len("file://"):] if path.startswith("file://") else path
    folder = os.path.isdir(local) or any(ch in local for ch in "*?[")
    return f"gsutil -m cp -r {path} gs://BUCKET/" if folder else f"gsutil cp {path} gs://BUCKET/"


def worker_paths(opts: Any) -> List[WorkerPath]:
    """Every path the workers open: the pipeline's own and those of ``--engine``'s flags."""
    from pipelines import engine_registry

    paths = [WorkerPath("--input", opts.input), WorkerPath("--output", opts.output, written=True)]
    if opts.skip_scored:
        paths.append(WorkerPath("--skip_scored", opts.skip_scored))
    return paths + engine_registry.worker_paths(opts)


def check_worker_paths(opts: Any, runner: str) -> None:
    """Refuses, for a remote runner, a path the workers open that lies on this machine's disk.

    Raises:
        UsageError: naming the flag, the path and the upload that fixes it.
    """
    in_image = os.environ.get(IN_IMAGE_VARIABLE) == "1"
    for item in worker_paths(opts):
        workers = f"{runner}'s workers cannot reach this machine's disk"
        if item.path is None:
            where = f" ({item.note})" if item.note else ""
            raise UsageError(f"{item.flag} is not given, so the workers would read {item.default} on this machine's "
                             f"disk{where}: upload it (gsutil cp FILE gs://BUCKET/) and pass {item.flag} "
                             f"gs://BUCKET/FILE ({workers})")
        if not _is_local_path(item.path):
            continue
        name = os.path.basename(item.path.rstrip("/")) or "PATH"
        if item.written:
            raise UsageError(f"{item.flag} {item.path} is on this machine's disk, and the workers write it there on "
                             f"their own disks, where it is lost with them: pass {item.flag} gs://BUCKET/{name} "
                             f"({workers})")
        if in_image and os.path.isfile(item.path):  # read only, and in the image the workers run
            _LOG.info("%s %s is a file in the worker image this launch runs in; the workers read it there "
                      "(--sdk_container_image must be this image)", item.flag, item.path)
            continue
        note = f", {item.note}" if item.note else ""
        raise UsageError(f"{item.flag} {item.path} is on this machine's disk: upload it ({_upload(item.path)}) and "
                         f"pass {item.flag} gs://BUCKET/{name}{note} ({workers})")


def check_launch(options: Any, opts: Any, local: bool) -> None:
    """Every launch check for this run, before anything is read, built or staged.

    Args:
        options: The job's ``PipelineOptions``.
        opts: Its ``pipelines.settings.ClassifyOptions`` view.
        local: The runner runs here (DirectRunner, Prism).

    Raises:
        UsageError: naming the flag and the fix.
    """
    from pipelines import engine_registry

    engine_registry.check(opts, local)  # e.g. --providers cuda with a CPU-only onnxruntime here
    if local:
        return
    environment = workers_environment(options)
    if environment == "this machine":
        return
    if environment == "image":
        check_versions(image_versions(), launcher_versions(), bool(opts.allow_version_mismatch))
    runner = str(options.view_as(StandardOptions).runner).split(".")[-1]
    check_worker_paths(opts, runner)


#: Portable environment types whose SDK workers run as processes of this machine.
_THIS_MACHINE_ENVIRONMENTS = {"LOOPBACK", "PROCESS"}
_LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1"}


def workers_environment(options: Any) -> str:
    """Where a remote runner's SDK workers run, which decides what the launch checks hold them to.

    Returns:
        "image": the worker image (Dataflow, or a portable runner's default DOCKER environment), so
        the launcher must match its versions and the workers cannot read this machine's disk;
        "this machine": LOOPBACK or PROCESS workers, or an EXTERNAL worker pool on localhost: they
        run this machine's Python and read its disk, like a local runner;
        "elsewhere": an EXTERNAL worker pool on another host: its Python is the pool's own (Beam
        checks the SDK at connection), but it cannot read this machine's disk.
    """
    from apache_beam.options.pipeline_options import PortableOptions

    portable = options.view_as(PortableOptions)
    kind = (portable.environment_type or "").upper()
    if kind in _THIS_MACHINE_ENVIRONMENTS:
        return "this machine"
    if kind == "EXTERNAL":
        host = (portable.environment_config or "").rsplit(":", 1)[0]
        return "this machine" if host in _LOOPBACK_HOSTS else "elsewhere"
    return "image"


def check_input(path: str) -> None:
    """Fails fast when the input cannot be used: it matches nothing, cannot be listed, or is an
    unusable manifest (unreadable, not UTF-8, no 'uri' column, no entries) - a broken setup,
    not a bad record.

    Raises:
        UsageError: naming ``--input`` and the fix.
    """
    from apache_beam.io.filesystems import FileSystems

    from transforms.images import ManifestError, check_manifest, has_glob, is_manifest, normalize_pattern

    if is_manifest(path):
        try:
            check_manifest(path)
        except ManifestError as e:
            raise UsageError(f"--input {path}: {e}") from None
        return
    if not storage.is_url(path) and os.path.isdir(path):
        try:
            with os.scandir(path):
                pass
        except OSError as e:
            raise UsageError(f"--input {path} is a directory the job cannot list ({e.strerror}); give the job's "
                             f"user read and execute permission on it") from None
    pattern = normalize_pattern(path)
    try:
        with warnings.catch_warnings():
            # An escaped '[' ("[[]", a folder named "Holiday [2019]") makes Beam's regex warn.
            warnings.simplefilter("ignore", FutureWarning)
            matched = FileSystems.match([pattern], limits=[1])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError and friends
        raise UsageError(f"Cannot list --input {path}: {e}") from e
    if not matched:
        hint = (" A folder in a bucket needs a trailing slash (gs://bucket/dir/) or a glob (gs://bucket/dir/*.jpg)."
                if storage.is_url(path) and not path.endswith("/") and not has_glob(path) else "")
        if path.startswith("~"):
            hint += " A quoted '~' is not expanded: write the full path ($HOME/...)."
        raise UsageError(f"--input {path} matches no files; check the path or glob (quote it in the shell).{hint}")


def check_model(model: ModelFile, summary, output_name: str, config) -> None:
    """Checks, before anything runs, that the preprocessing and the model fit together.

    A mismatch here would otherwise turn every image into a dead letter (a crop the model
    does not take) or fail the job midway (an output name the model lacks).

    Args:
        model: The ONNX model the engine's flags name (``pipelines.engine_registry.model_file``).
        summary: Its ``engines.onnx_summary.OnnxSummary``.
        output_name: ``--output_name``.
        config: The preprocessing (an ``images.pillow_decoder.PreprocessConfig``).

    Raises:
        UsageError: ``--output_name`` is not an output of the model, or the crop (``--crop``: height,
            and width) does not fit its input's fixed height or width, naming each side and the flag.
        EngineError: the model is not one this pipeline can feed (several inputs, or not uint8
            [N, height, width, 3] images), naming the fix.
    """
    outputs = [name for name, _, _ in summary.outputs]
    if output_name not in outputs:
        raise UsageError(f"--output_name {output_name!r} is not an output of {model.path}; its outputs are "
                         f"{outputs}")
    if len(summary.inputs) != 1:
        raise EngineError(f"{model.path} has {len(summary.inputs)} inputs {[n for n, _, _ in summary.inputs]}; this "
                          f"pipeline feeds one batch of images (uint8 [N, height, width, 3])")
    (name, dtype, dims), = summary.inputs
    height, width = config.crop_size
    if dtype != "UINT8" or len(dims) != 4 or dims[3] != 3:
        raise EngineError(f"{model.path} input {name!r} is {dtype} {list(dims)}; this pipeline feeds uint8 "
                          f"[N, {height}, {width}, 3] images: export the model with its preprocessing "
                          f"inside (see `python -m model_tools.export_efficientnet --help`)")
    # Each side against its own: -1 is a dynamic dimension, which any crop fits.
    sides = (("height", height, dims[1]), ("width", width, dims[2]))
    wrong = [f"{side} {crop} is not {fixed}" for side, crop, fixed in sides if 0 < fixed != crop]
    if wrong:
        want_h, want_w = (fixed if fixed > 0 else crop for _, crop, fixed in sides)
        crop_flag = f"--crop {height}" if height == width else f"--crop {height} x {width} (height x width)"
        fix = f"--crop {want_h}" if want_h == want_w else f"--crop for {want_h} high x {want_w} wide"
        raise UsageError(f"{crop_flag} does not fit {model.path} ({', '.join(wrong)}): its input {name!r} is "
                         f"{list(dims)}; pass {fix} (and --resize >= {max(want_h, want_w)})")


def check_output(output: str, input_path: str) -> None:
    """Fails at start when ``--output`` cannot take the results, rather than after scoring.

    Refused: an existing file (or a path under one), a folder the job cannot write, a folder
    holding prediction or dead-letter files that no committed run of this pipeline wrote (the
    commit would delete or mix with them), and a folder inside a recursively scored ``--input``
    folder (a rerun would score the outputs). A partition this pipeline committed (its
    ``_SUCCESS`` record or ``_scored-*`` files, transforms/commit.py) is not refused: a rerun
    replaces it as a whole.

    Raises:
        UsageError: naming ``--output`` and the fix.
    """
    from apache_beam.io.filesystems import FileSystems

    from pipelines import partitions
    from transforms.images import has_glob

    if not storage.is_url(output):
        probe = os.path.abspath(output)
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if os.path.islink(probe) and not os.path.exists(probe):
            # Not "an existing file": the link is there, what it names is not (an unmounted disk, a moved folder).
            what = "is" if probe == os.path.abspath(output) else f"is under {probe}, which is"
            raise UsageError(f"--output {output} {what} a dangling symbolic link to {os.readlink(probe)} (the target "
                             f"does not exist); remove it or point it at a directory")
        if not os.path.isdir(probe):
            what = "is an existing file" if probe == os.path.abspath(output) else f"is under the file {probe}"
            raise UsageError(f"--output {output} {what}; pass a directory (it is created if missing)")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise UsageError(f"--output {output}: the job's user cannot write to {probe}; pass a writable "
                             f"directory")
        if os.path.isdir(input_path) and not has_glob(input_path):
            inside = os.path.commonpath([os.path.realpath(input_path), os.path.realpath(output)])
            if inside == os.path.realpath(input_path):
                raise UsageError(f"--output {output} is inside --input {input_path}, which is scored recursively: "
                                 f"a rerun would score the results as images; pass an output directory outside "
                                 f"it")
    try:
        earlier = [m.path for prefix in ("predictions-", "dead_letter-")
                   for m in FileSystems.match([storage.join(output, prefix + "*")], limits=[1])[0].metadata_list]
    except Exception:  # a folder that does not exist yet has nothing to list
        earlier = []
    if earlier and not partitions.is_partition(output):
        raise UsageError(f"--output {output} already holds results of an earlier run ({earlier[0]}) that this "
                         f"pipeline did not commit (no _SUCCESS or _scored files: an older version or another "
                         f"tool wrote them); a rerun replaces only a partition it committed, and these files would "
                         f"mix with this run's: pass a new directory or delete them")
