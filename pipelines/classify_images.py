"""Score a folder, bucket or manifest of images with an image classifier on Apache Beam.

    python -m pipelines.classify_images --input 'gs://bucket/photos/*.jpg' --output gs://bucket/scored \\
        [--model PATH] [--engine onnxruntime|tensorrt] [--batch_size N] [--top_k K] \\
        [--output_format jsonl|parquet] [any Beam pipeline option: --runner, --direct_num_workers, ...]

Outputs in ``--output/run-RUN_ID/``: ``predictions-*.jsonl`` (or ``.parquet``), one row per image
``{"uri", "top_k": [{"class_id", "label", "score"}, ...]}``; ``dead_letter-*.jsonl``
with ``{"uri", "error", "stage"}`` for every input that could not be scored;
``stats.json`` and ``stats.png`` with throughput and per-stage timing; ``_scored-*.jsonl`` (what
was scored, for ``--skip_scored``). ``--output/_SUCCESS``, swapped in last by the commit step,
names the committed run and lists its files: read those (transforms/commit.py).
Every input ends as exactly one prediction or one dead-letter row (or is skipped with
``--skip_scored``). Each run replaces ``--output`` as a whole; ``{date}`` in ``--input`` and
``--output`` is filled from ``--run_date`` (docs/scheduling.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from engines import storage
from engines.base import EngineError, UsageError
from engines.dali_decoder import DaliDecoderOptions as DaliDecoderDefaults
from engines.pillow_decoder import PreprocessConfig
from pipelines import launch_checks, partitions, submission
from pipelines.engine_registry import engine_names
from pipelines.stats import ProgressPrinter, build_stats, collect_metrics, committed_stats, write_stats
from transforms import bigquery
from transforms.faults import with_faults
from transforms.images import DEAD_LETTER, CountDeadLetters, ImageRefs, ReadImageBatches
from transforms.inference import ImageBatchHandler, ScorerLoader
from transforms.postprocess import FailedBatchToDeadLetters, TopKBatches
from transforms.reading import DEFAULT_READ_TIMEOUT_S
from transforms.commit import CommitConflict
from transforms.scored import CheckScored
from transforms.sinks import FORMATS

_LOG = logging.getLogger(__name__)

#: Where ``make model`` (python -m engines.export_efficientnet) puts the default model.
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "efficientnet_lite0.onnx")
DECODE_MODES = ("auto", "gpu", "cpu", "dali_cpu")
#: DALI decoders per loaded model. Four bundle threads on one H200 (benchmarks/results/h200-concurrency.json,
#: 5,000 JPEGs x 4, batch 256, steady state): one decoder taken in turns 2,944 images/s, one decoder per
#: thread 1,536 (four DALI pipelines and their CPU threads contend with the engine), one thread alone 2,458.
DEFAULT_MAX_DECODERS = 1
#: Batches per inference call with GPU decode (the decoder overlaps all but a call's first).
GPU_DECODE_BATCHES_PER_CALL = 4
LOCAL_RUNNERS = ("DirectRunner", "direct", "PrismRunner", "prism", "BundleBasedDirectRunner",
                 "SwitchingDirectRunner", "FnApiRunner")


class ClassifyOptions(PipelineOptions):
    """Command-line options of ``pipelines.classify_images`` (every Beam option works too)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.epilog = ("Every standard Beam pipeline option is accepted as well, for example --runner "
                         "(DirectRunner, DataflowRunner), --direct_running_mode (in_memory, multi_threading, "
                         "multi_processing), --direct_num_workers, --project, --region, --temp_location, "
                         "--sdk_container_image, --dataflow_service_options, --machine_type; see "
                         "https://beam.apache.org/documentation/runners/direct/ and the README.")
        parser.add_argument("--input", default=None,
                            help="Images: a glob (local or gs://...), a directory, or a manifest file "
                                 "(.txt one URI per line; .csv/.jsonl with a 'uri' column and optional 'id'). "
                                 "{date} is replaced by --run_date.")
        parser.add_argument("--output", default=None,
                            help="Output directory (local or gs://...), replaced as a whole by each run "
                                 "(committed with a _SUCCESS file). {date} is replaced by --run_date.")
        parser.add_argument("--run_date", default=None,
                            help="The run's date, YYYY-MM-DD, 'today' or 'yesterday' (UTC); fills {date} in "
                                 "--input and --output. Default: today (UTC).")
        parser.add_argument("--skip_scored", default=None, metavar="ROOT",
                            help="Skip inputs already scored by a committed run under ROOT (same URI, size and "
                                 "modification time); changed files are scored again. Default: score all.")
        # Test-only (transforms/faults.py): STAGE:PERCENT:DIR[:always|:kill] fails chosen bundles.
        parser.add_argument("--test_faults", default=None, help=argparse.SUPPRESS)
        parser.add_argument("--model", default=None,
                            help=f"ONNX model for --engine onnxruntime (default: the prepared "
                                 f"EfficientNet-Lite0, {DEFAULT_MODEL}).")
        parser.add_argument("--engine", default="onnxruntime", choices=engine_names(),
                            help="Inference engine (pipelines/engine_registry.py). Default: onnxruntime.")
        parser.add_argument("--providers", default="cpu",
                            help="ONNX Runtime execution providers, comma-separated: cpu, cuda, tensorrt. "
                                 "Default: cpu.")
        parser.add_argument("--intra_op_threads", type=int, default=0,
                            help="ONNX Runtime threads per batch; 0 = one per core. Default: 0.")
        parser.add_argument("--ort_sessions", type=int, default=1,
                            help="ONNX Runtime sessions of the model per process, each with its own "
                                 "--intra_op_threads: concurrent batches (several bundle threads, e.g. "
                                 "--direct_running_mode=multi_threading) each get one. Default: 1.")
        parser.add_argument("--ort_spinning", default="off", choices=("on", "off", "run"),
                            help="ONNX Runtime idle threads spin-wait (on), sleep (off, leaves the cores to "
                                 "decoding), or spin only while a batch runs and stop when it returns (run). "
                                 "Default: off.")
        parser.add_argument("--engine_path", default=None, help="TensorRT: a serialized engine (.plan).")
        parser.add_argument("--onnx_path", default=None,
                            help="TensorRT: an ONNX model to build (or fetch from --engine_cache) on the worker.")
        parser.add_argument("--engine_cache", default=None,
                            help="TensorRT: directory (local or gs://) of plans keyed by GPU, TensorRT "
                                 "version and build options.")
        parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16"),
                            help="TensorRT build precision with --onnx_path. Default: fp16.")
        parser.add_argument("--trt_profile", dest="trt_profiles", action="append", default=None,
                            metavar="MIN,OPT,MAX",
                            help="TensorRT optimisation profile for the batch dimension with --onnx_path "
                                 "(repeatable). Default: 1,B,B with B = --batch_size or 64.")
        parser.add_argument("--num_contexts", type=int, default=2,
                            help="TensorRT execution contexts per engine: copies in, compute and copies out "
                                 "of consecutive batches overlap. Default: 2.")
        parser.add_argument("--cuda_graphs", action="store_true",
                            help="TensorRT: capture and replay a CUDA graph per batch shape.")
        parser.add_argument("--workspace_gib", type=float, default=None,
                            help="TensorRT builder workspace limit in GiB. Default: TensorRT's.")
        parser.add_argument("--timing_cache", default=None,
                            help="TensorRT builder timing cache to reuse and update (local or gs://): one file per "
                                 "GPU type and TensorRT version, PATH.<gpu>-sm<cc>-trt<version>, so caches of "
                                 "different GPUs never merge.")
        parser.add_argument("--batch_size", type=int, default=None,
                            help="Largest batch. Default: 32 for onnxruntime; the profile max for tensorrt.")
        parser.add_argument("--min_batch_size", type=int, default=None,
                            help="TensorRT: the batch size the profile is tuned for (default: the profile opt); "
                                 "batches are always --batch_size images, only a bundle's last is shorter.")
        parser.add_argument("--share_model_across_processes", action="store_true",
                            help="One engine copy per worker machine instead of one per process.")
        parser.add_argument("--model_copies", type=int, default=1,
                            help="With --share_model_across_processes: copies per machine (e.g. one per GPU).")
        parser.add_argument("--top_k", type=int, default=5, help="Classes per image. Default: 5.")
        parser.add_argument("--output_format", default="jsonl", choices=FORMATS,
                            help="Predictions format. Default: jsonl.")
        parser.add_argument("--output_name", default="logits", help="Engine output holding the logits.")
        parser.add_argument("--labels_file", default=None,
                            help="Class names, one per line or a JSON list (default: the model's 'labels' "
                                 "metadata, if any).")
        parser.add_argument("--resize", type=int, default=256, help="Shorter side before the crop. Default 256.")
        parser.add_argument("--crop", type=int, default=224, help="Centre-crop size. Default 224.")
        parser.add_argument("--max_pixels", type=int, default=PreprocessConfig.max_pixels,
                            help="Refuse larger images (decompression bombs). Default: 89478485.")
        parser.add_argument("--decode", default="auto", choices=DECODE_MODES,
                            help="Where images are decoded: gpu (NVIDIA DALI on the engine's GPU; files the "
                                 "header pre-screen does not pass still decode on the CPU), cpu (Pillow), "
                                 "dali_cpu (the DALI graph on the CPU: CI and debugging), auto (gpu where a CUDA "
                                 "device and DALI are present, else cpu). Default: auto.")
        parser.add_argument("--hw_decoder_load", type=float, default=DaliDecoderDefaults.hw_decoder_load,
                            help="--decode gpu: share of JPEG work for the GPU's hardware JPEG decoder where it has "
                                 "one (0..1). Default: 0.65.")
        parser.add_argument("--dali_threads", type=int, default=-1,
                            help="--decode gpu/dali_cpu: DALI's CPU threads (JPEG parsing and Huffman decoding for "
                                 "the GPU, non-JPEG formats); -1 = the worker's cores, at most 16 (on an H100 host: "
                                 "8 -> 10.0k, 16 -> 15.3k images/s decoded). Default: -1.")
        parser.add_argument("--max_decoders", type=int, default=DEFAULT_MAX_DECODERS,
                            help="--decode gpu/dali_cpu: most DALI decoders per loaded model. Bundle threads that "
                                 "share the model (--direct_running_mode multi_threading, Dataflow's harness "
                                 "threads) each borrow a decoder for a whole inference call; 0 builds one per call "
                                 "running at once, N caps them and further calls wait (1: one decoder, taken in "
                                 "turns). Each decoder holds its own DALI pipeline, about 0.9 GB of GPU memory at "
                                 "--batch_size 256 (benchmarks/gpu_memory.py, H100), and --dali_threads CPU "
                                 "threads. Default: 1, measured faster (H200, four bundle threads, steady state: "
                                 "one decoder 2,944 images/s, one per thread 1,536).")
        parser.add_argument("--decode_threads", type=int, default=-1,
                            help="Threads per DoFn that read (and on the CPU path decode) ahead of inference; "
                                 "-1 = the worker's cores (at most 16), 0 = inline. Default: -1.")
        parser.add_argument("--prefetch", type=int, default=None,
                            help="Batches read ahead per DoFn while the engine runs the current ones. Default: "
                                 "twice the batches per inference call (8 with GPU decode, else 2).")
        parser.add_argument("--read_timeout_s", type=float, default=DEFAULT_READ_TIMEOUT_S,
                            help="A read of one image that makes no progress this long (a stalled gs:// object, a "
                                 "stuck mount) becomes a dead letter; 0 = no limit. Default: 60.")
        parser.add_argument("--no_jpeg_draft", action="store_true", help="Decode JPEGs at full size.")
        parser.add_argument("--progress_every_s", type=float, default=5.0,
                            help="Local runs: seconds between progress lines (0 = off). Default 5.")
        parser.add_argument("--allow_version_mismatch", action="store_true",
                            help="Remote runners: launch even though this environment's Python or Apache Beam "
                                 "differs from the worker image's (pipelines/image_versions.txt), e.g. for another "
                                 "--sdk_container_image built for this environment.")
        bigquery.add_flags(parser)


def engine_recipe(options: ClassifyOptions):
    """The engine recipe for --engine, from the one registry (``pipelines/engine_registry.py``)."""
    from pipelines import engine_registry

    if options.engine == "onnxruntime" and not options.model:
        options.model = DEFAULT_MODEL
    return engine_registry.recipe(options)


def engine_on_gpu(options: ClassifyOptions) -> bool:
    """True when the engine runs on a GPU (TensorRT, or ONNX Runtime with a GPU provider)."""
    from pipelines import engine_registry

    return engine_registry.on_gpu(options)


def resolve_decode(options: ClassifyOptions, local: bool) -> Tuple[str, str]:
    """Where images are decoded, and why (logged in one line, recorded in stats.json).

    ``auto`` is ``gpu`` when the engine runs on a GPU and, for a local run, DALI and a CUDA
    device are present here; for a remote runner the workers' GPUs and the worker image's DALI
    are assumed (the Dockerfile installs it). Never a silent fall-back: an explicit ``gpu``
    that cannot work stops the job at start.

    Raises:
        EngineError: ``--decode gpu`` with an engine on the CPU, or locally without DALI or a GPU.
    """
    from engines.dali_decoder import gpu_decode_unavailable

    mode = options.decode
    if mode in ("cpu", "dali_cpu"):
        return mode, "asked for"
    on_gpu = engine_on_gpu(options)
    missing = gpu_decode_unavailable() if local else None
    if mode == "gpu":
        if not on_gpu:
            raise UsageError("--decode gpu feeds decoded images on the GPU to the engine, which runs on the CPU "
                             "here: add --providers cuda (or --engine tensorrt), or pass --decode cpu")
        if missing:
            raise UsageError(f"--decode gpu cannot run here: {missing}. Install the gpu extra "
                             f"(pip install -e '.[gpu]') on a CUDA machine, or pass --decode cpu")
        return "gpu", "asked for"
    if not on_gpu:
        return "cpu", "auto: the engine runs on the CPU"
    if missing:
        return "cpu", f"auto: {missing}"
    return "gpu", "auto: the engine runs on a GPU and DALI is present" if local else \
        "auto: the engine runs on the workers' GPUs (the worker image carries DALI)"


def make_handler(options: ClassifyOptions, decode: str = "cpu") -> Tuple[Any, Dict[str, Any], Optional[List[str]]]:
    """Builds the image pipeline's model handler (no engine is loaded here).

    Args:
        options: The job's options.
        decode: ``cpu``, ``gpu`` or ``dali_cpu`` (see :func:`resolve_decode`).

    Returns:
        (handler, engine description for stats, class names: --labels_file, else the model's
        own metadata or the TensorRT plan's sidecar, else None).
    """
    from engines.dali_decoder import DaliDecoderOptions

    explicit_labels = read_labels(options.labels_file) if options.labels_file else None
    recipe = engine_recipe(options)
    engine_loader, batch, info = recipe.loader, recipe.batch_size, recipe.info
    labels = recipe.labels or (_labels(_onnx_summary(recipe.labels_model, recipe.labels_flag))
                               if recipe.labels_model and not explicit_labels else None)
    config = preprocess_config(options)
    decoder = None
    if decode in ("gpu", "dali_cpu"):
        try:
            decoder = DaliDecoderOptions(resize=config.resize, crop=config.crop, max_batch=batch,
                                         device="gpu" if decode == "gpu" else "cpu",
                                         hw_decoder_load=options.hw_decoder_load,
                                         threads=options.dali_threads if options.dali_threads > 0
                                         else min(16, os.cpu_count() or 1))
        except EngineError as e:
            raise UsageError(f"bad decode flags: {e} (see --hw_decoder_load, --dali_threads, --batch_size)") from None
        info = {**info, "decode": decode, "hw_decoder_load": options.hw_decoder_load if decode == "gpu" else None}
    else:
        info = {**info, "decode": "cpu"}
    handler = ImageBatchHandler(
        ScorerLoader(engine_loader, decoder, config, max_decoders=options.max_decoders), options.output_name,
        images_per_batch=batch,
        # With a decoder, each call decodes batch k+1 while the engine runs batch k; only a call's
        # first batch waits for its decode, so calls take several batches.
        batches_per_call=GPU_DECODE_BATCHES_PER_CALL if decoder else 1,
        share_across_processes=options.share_model_across_processes, model_copies=options.model_copies,
        metrics_namespace=options.engine, model_id=str(info.get("model", "")))
    return handler, info, explicit_labels or labels


def read_labels(path: str) -> List[str]:
    """Class names from ``--labels_file`` (one per line or a JSON list, UTF-8).

    Raises:
        EngineError: missing, unreadable or not UTF-8, naming the flag.
    """
    from engines import storage
    from engines.labels import parse_labels

    data = storage.read_bytes(path, "--labels_file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EngineError(f"--labels_file {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"re-save it as UTF-8") from None
    labels = parse_labels(text)
    if not labels:
        raise EngineError(f"--labels_file {path} holds no class names; one per line or a JSON list")
    return labels


@functools.lru_cache(maxsize=4)
def _onnx_summary(path: str, flag: str = "--model"):
    """Labels and named I/O of an ONNX model (read once per launcher, local or gs://).

    Raises:
        EngineError: the file is missing or not an ONNX model, naming ``flag`` and the path.
    """
    from engines import storage
    from engines.onnx_summary import summarize_onnx

    data = storage.read_bytes(path, f"{flag} file")
    try:
        return summarize_onnx(data)
    except EngineError as e:
        raise EngineError(f"{flag} {path}: {e}; pass an .onnx model file (`make model` prepares the default "
                          f"one)") from None


def _labels(summary) -> Optional[List[str]]:
    return list(summary.labels) if summary.labels is not None else None


def preprocess_config(options: ClassifyOptions) -> PreprocessConfig:
    """The preprocessing the flags ask for.

    Raises:
        EngineError: sizes that cannot work together, naming the flags.
    """
    try:
        return PreprocessConfig(resize=options.resize, crop=options.crop, max_pixels=options.max_pixels,
                                draft=not options.no_jpeg_draft)
    except ValueError as e:
        raise UsageError(f"bad preprocessing flags: {e} (see --resize, --crop, --max_pixels)") from None


def check_setup(options: ClassifyOptions) -> PreprocessConfig:
    """Checks, before anything runs, that the preprocessing and the model fit together.

    A mismatch here would otherwise turn every image into a dead letter (a crop the model
    does not take) or fail the job midway (an output name the model lacks).

    Returns:
        The preprocessing config.

    Raises:
        EngineError: naming the flag to change.
    """
    config = preprocess_config(options)
    model = (options.model or DEFAULT_MODEL) if options.engine == "onnxruntime" else options.onnx_path
    if not model:
        return config  # a TensorRT plan: its shapes are checked when a worker loads it
    summary = _onnx_summary(model, "--model" if options.engine == "onnxruntime" else "--onnx_path")
    outputs = [name for name, _, _ in summary.outputs]
    if options.output_name not in outputs:
        raise UsageError(f"--output_name {options.output_name!r} is not an output of {model}; its outputs are "
                         f"{outputs}")
    if len(summary.inputs) != 1:
        raise EngineError(f"{model} has {len(summary.inputs)} inputs {[n for n, _, _ in summary.inputs]}; this "
                          f"pipeline feeds one batch of images (uint8 [N, crop, crop, 3])")
    (name, dtype, dims), = summary.inputs
    if dtype != "UINT8" or len(dims) != 4 or dims[3] != 3:
        raise EngineError(f"{model} input {name!r} is {dtype} {list(dims)}; this pipeline feeds uint8 "
                          f"[N, {config.crop}, {config.crop}, 3] images: export the model with its preprocessing "
                          f"inside (see `python -m engines.export_efficientnet --help`)")
    fixed = [d for d in dims[1:3] if d > 0]  # -1: a dynamic dimension, any crop fits
    if any(d != config.crop for d in fixed):
        raise UsageError(f"--crop {config.crop} does not fit {model}: its input {name!r} is {list(dims)}; pass "
                         f"--crop {fixed[0]} (and --resize >= {fixed[0]})")
    return config


def check_input(path: str) -> None:
    """Fails fast when the input cannot be used: it matches nothing, cannot be listed, or is an
    unusable manifest (unreadable, not UTF-8, no 'uri' column, no entries) - a broken setup,
    not a bad record."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.images import ManifestError, check_manifest, has_glob, is_manifest, normalize_pattern

    if is_manifest(path):
        try:
            check_manifest(path)
        except ManifestError as e:
            raise UsageError(f"--input {path}: {e}") from None
        return
    if "://" not in path and os.path.isdir(path):
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
                if "://" in path and not path.endswith("/") and not has_glob(path) else "")
        if path.startswith("~"):
            hint += " A quoted '~' is not expanded: write the full path ($HOME/...)."
        raise UsageError(f"--input {path} matches no files; check the path or glob (quote it in the shell).{hint}")


#: Largest batch (--batch_size, --min_batch_size, a --trt_profile size): 2**20 images of 224x224x3
#: are 147 GiB of uint8 pixels before any activation, more than any GPU or worker holds.
MAX_BATCH = 1 << 20
#: Longest time limit or interval: a read stalled for a day is stuck, not slow, and
#: threading's waits raise OverflowError past threading.TIMEOUT_MAX, which is what inf or 1e12 did midway.
MAX_SECONDS = 86_400
#: Most threads or sessions per process: each thread reserves a stack (8 MiB by default on Linux) and the
#: work is bound by the cores long before; thousands exhaust the process's memory or thread limit.
MAX_THREADS = 1024
#: Most batches read ahead per DoFn (--prefetch): they wait in memory, and 1024 batches of 32 images are
#: already 4.6 GiB of pixels per DoFn; 2 to 8 keep the engine fed.
MAX_PREFETCH = 1024
#: Largest --resize or --crop: a resized image with a 16384-pixel shorter side holds over 768 MiB of pixels,
#: and no classifier takes inputs near that size.
MAX_SIDE = 16_384
#: Largest --max_pixels: an image of 2**32 pixels decodes to 12 GiB of RGB in one thread.
MAX_PIXELS = 1 << 32
#: Most classes per image: the largest public label sets have about 22,000 (ImageNet-21k), and every
#: class is an entry in every prediction row.
MAX_TOP_K = 100_000
#: Most engine copies or TensorRT contexts: copies are one per GPU (no machine has 64) and each context
#: holds its own activation memory (2 or 3 already overlap copies and compute).
MAX_COPIES = 64
#: Largest --workspace_gib: more than any GPU's memory (an H200 has 141 GB).
MAX_WORKSPACE_GIB = 1024


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_range(flag: str, value, least, most, why: str) -> None:
    """Raises UsageError unless ``least <= value <= most`` (None is a flag left at its default).

    Raises:
        UsageError: naming the flag, the value, the accepted range and why it ends there.
    """
    if value is None or least <= value <= most:  # NaN fails both comparisons: refused too
        return
    accepted = f"accepted: {_show(least)} to {_show(most)}"
    if value != value:
        raise UsageError(f"{flag} must be a number, got nan ({accepted})")
    if value < least:
        raise UsageError(f"{flag} must be >= {_show(least)}, got {_show(value)} ({accepted})")
    raise UsageError(f"{flag} must be <= {_show(most)}, got {_show(value)} ({accepted}; {why})")


def _check_profiles(profiles: Optional[Sequence[str]]) -> None:
    """--trt_profile values: three batch sizes MIN,OPT,MAX, each 1..MAX_BATCH.

    Raises:
        UsageError: naming the flag, the value and the accepted form.
    """
    for text in profiles or ():
        parts = [part.strip() for part in str(text).split(",")]
        if len(parts) != 3 or not all(part.isdigit() and 1 <= int(part) <= MAX_BATCH for part in parts):
            raise UsageError(f"--trt_profile {text} is not three batch sizes MIN,OPT,MAX such as 1,64,256 (accepted: "
                             f"whole numbers 1 to {MAX_BATCH}; a batch of {MAX_BATCH} images already holds 147 GiB of "
                             f"pixels)")


def check_flags(options: ClassifyOptions) -> None:
    """Fails at start on numeric flags out of range, naming the flag (not a traceback midway).

    Every numeric flag has a lower and an upper bound: inf, nan or a huge value is a typo that would
    otherwise fail on a worker (a timeout past threading's limit overflows) or exhaust memory there.
    Non-numbers for whole-number flags are refused by argparse before this runs.

    Raises:
        UsageError: naming the flag, the value and the accepted range.
    """
    batch = "a batch this large holds more pixels than any GPU or worker"
    threads = "each thread reserves a stack; the cores bound the work long before"
    seconds = "a day: beyond it a stall is a stuck read or a typo"
    rules = [
        ("--batch_size", options.batch_size, 1, MAX_BATCH, batch),
        ("--min_batch_size", options.min_batch_size, 1, MAX_BATCH, batch),
        ("--top_k", options.top_k, 1, MAX_TOP_K, "more classes than the largest public label sets"),
        ("--decode_threads", options.decode_threads, -1, MAX_THREADS, threads),
        ("--dali_threads", options.dali_threads, -1, MAX_THREADS, threads),
        ("--intra_op_threads", options.intra_op_threads, 0, MAX_THREADS, threads),
        ("--ort_sessions", options.ort_sessions, 1, MAX_THREADS, "each session holds its own activations"),
        ("--prefetch", options.prefetch, 1, MAX_PREFETCH, "prefetched batches wait in memory"),
        ("--read_timeout_s", options.read_timeout_s, 0, MAX_SECONDS, seconds),
        ("--progress_every_s", options.progress_every_s, 0, MAX_SECONDS, seconds),
        ("--model_copies", options.model_copies, 1, MAX_COPIES, "one copy per GPU"),
        ("--num_contexts", options.num_contexts, 1, MAX_COPIES, "each context holds its own activation memory"),
        ("--resize", options.resize, 1, MAX_SIDE, "no classifier takes inputs near this size"),
        ("--crop", options.crop, 1, MAX_SIDE, "no classifier takes inputs near this size"),
        ("--max_pixels", options.max_pixels, 1, MAX_PIXELS, "such an image decodes to 12 GiB in one thread"),
        ("--hw_decoder_load", options.hw_decoder_load, 0, 1, "a share of the JPEG work"),
        ("--max_decoders", options.max_decoders, 0, MAX_THREADS, "each decoder holds GPU memory and CPU threads"),
    ]
    for flag, value, least, most, why in rules:
        _check_range(flag, value, least, most, why)
    workspace = options.workspace_gib
    if workspace is not None and not 0 < workspace <= MAX_WORKSPACE_GIB:
        # Not _check_range: 0 is refused too (TensorRT needs some workspace; leave the flag out for its default).
        raise UsageError(f"--workspace_gib must be > 0 and <= {MAX_WORKSPACE_GIB}, got {_show(workspace)} (accepted: "
                         f"above 0 to {MAX_WORKSPACE_GIB} GiB, more than any GPU's memory; leave it out for "
                         f"TensorRT's default)")
    _check_profiles(options.trt_profiles)
    if options.batch_size and options.min_batch_size and options.min_batch_size > options.batch_size:
        raise UsageError(f"--min_batch_size {options.min_batch_size} is larger than --batch_size "
                         f"{options.batch_size}; lower it or raise --batch_size")
    if options.model_copies > 1 and not options.share_model_across_processes:
        raise UsageError("--model_copies > 1 needs --share_model_across_processes (one copy per GPU)")


#: ONNX Runtime on CPU took 70-85 x a batch's uint8 input bytes of extra resident memory for
#: EfficientNet-Lite0 at batches 16-256 (activations; measured with ru_maxrss, issue 12). Models
#: differ; this is used only to refuse batch sizes that cannot fit, not to pick one.
ACTIVATION_BYTES_PER_INPUT_BYTE = 90


def memory_limit_bytes() -> Optional[int]:
    """The memory this process may use: its cgroup limit (v2 or v1) or the machine's RAM, or None."""
    limits = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
            if text.isdigit() and int(text) < 1 << 60:
                limits.append(int(text))
        except OSError:
            continue
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    return min(limits) if limits else None


def check_batch(options: ClassifyOptions, config: PreprocessConfig, local: bool) -> None:
    """Fits ``--batch_size`` to the model's batch dimension and, on a local CPU run, to memory.

    A model exported with a fixed batch of 1 gets batches of 1 (logged); any other fixed batch,
    or a ``--batch_size`` the model does not take, stops the job here instead of failing every
    batch. A batch whose activations and prefetched images cannot fit in memory would turn every
    image into an "failed to allocate" dead letter; it is refused with the largest that fits.

    Raises:
        EngineError: naming ``--batch_size`` (or the model) and the fix.
    """
    if options.engine != "onnxruntime":
        return  # TensorRT: the engine's profile bounds the batch (checked when it loads)
    model = options.model or DEFAULT_MODEL
    (name, _, dims), = _onnx_summary(model, "--model").inputs
    if dims and dims[0] > 0:
        if dims[0] != 1:
            raise EngineError(f"{model} has a fixed batch dimension of {dims[0]} (input {name!r} is {list(dims)}); "
                              f"the last batch of a run is shorter, so export the model with a dynamic batch "
                              f"dimension (see `python -m engines.export_efficientnet --help`)")
        if (options.batch_size or 1) != 1 or (options.min_batch_size or 1) != 1:
            raise UsageError(f"--batch_size {options.batch_size} does not fit {model}: its input {name!r} is "
                             f"{list(dims)}, a fixed batch of 1; pass --batch_size 1 or export the model with a "
                             f"dynamic batch dimension")
        options.batch_size = options.min_batch_size = 1
        _LOG.info("batch size 1 chosen from the model's fixed batch dimension (%s is %s)", name, list(dims))
    if not local or options.providers.strip().lower() != "cpu":
        return  # the workers' or the GPU's memory is not this machine's
    limit = memory_limit_bytes()
    from engines.onnxruntime_engine import CPU_BATCH_SIZE

    batch = options.batch_size or CPU_BATCH_SIZE
    image_bytes = config.crop * config.crop * 3
    prefetch = (options.prefetch or 2) * batch  # --prefetch counts batches
    sessions = options.ort_sessions  # concurrent batches: each ONNX Runtime session runs one
    need = (batch * ACTIVATION_BYTES_PER_INPUT_BYTE * sessions + prefetch + batch) * image_bytes
    if limit and need > 0.8 * limit:
        fits = int(0.8 * limit / image_bytes / (ACTIVATION_BYTES_PER_INPUT_BYTE * sessions + 3))
        raise UsageError(f"--batch_size {batch} needs about {need / 2**30:.1f} GiB (activations of "
                         f"{sessions} concurrent batch(es) and {prefetch} prefetched images), over the "
                         f"{limit / 2**30:.1f} GiB this job may use; pass --batch_size {max(fits, 1)} or less")


def check_output(output: str, input_path: str) -> None:
    """Fails at start when ``--output`` cannot take the results, rather than after scoring.

    Refused: an existing file (or a path under one), a folder the job cannot write, a folder
    holding prediction or dead-letter files that no committed run of this pipeline wrote (the
    commit would delete or mix with them), and a folder inside a recursively scored ``--input``
    folder (a rerun would score the outputs). A partition this pipeline committed (issue 11:
    ``_SUCCESS`` or ``_scored-*`` files) is not refused: a rerun replaces it as a whole.

    Raises:
        EngineError: naming ``--output`` and the fix.
    """
    from apache_beam.io.filesystems import FileSystems

    from engines import storage
    from transforms.images import has_glob

    if "://" not in output:
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


def common_failure(dead_letter_files: Sequence[str], stats: Dict[str, Any]) -> Optional[str]:
    """The setup problem behind a run in which every input failed the same way, or None.

    Read from the written dead-letter rows after the run: when nothing was predicted and every
    row failed at the same stage for the same reason (file names and numbers aside), the cause
    is the setup, not the images.

    Returns:
        "<count> of <inputs> inputs failed at <stage>: <one reason>; <flag to change>", or None.
    """
    import json
    import re

    from apache_beam.io.filesystems import FileSystems

    if stats["predictions"] or not stats["dead_letters"] or stats["unaccounted"]:
        return None
    kinds, example = set(), None
    for path in dead_letter_files:
        with FileSystems.open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                row = json.loads(line)
                reason = row["error"].replace(row["uri"], "<file>")
                kinds.add((row["stage"], re.sub(r"[0-9]+", "N", re.sub(r"'[^']*'|\"[^\"]*\"", "''", reason))))
                example = example or row
                if len(kinds) > 1:
                    return None
    if example is None:
        return None
    stage, reason = example["stage"], example["error"]
    if stage == "inference":
        flag = ("lower --batch_size" if re.search(r"alloc|memory", reason, re.I)
                else "check --model (or --engine_path) and --batch_size")
    elif "pixel limit" in reason:
        flag = "raise --max_pixels if the files are trusted"
    else:
        flag = "check --input"
    return (f"all {stats['dead_letters']} inputs failed at {stage} for the same reason, a setup problem rather "
            f"than bad images: {reason} ({flag})")


def read_prefetch(options: ClassifyOptions, handler) -> int:
    """Batches read ahead: --prefetch, else twice the batches one inference call takes."""
    return options.prefetch or 2 * handler.batch_elements_kwargs()["max_batch_size"]


def build_pipeline(pipeline: beam.Pipeline, options: ClassifyOptions, handler, labels,
                   progress_dir: Optional[str] = None, decode: str = "cpu", plan=None, bigquery_target=None):
    """Adds the scoring transforms to ``pipeline``, ending with the commit of ``--output``.

    Batches, not images, travel through Beam: refs are grouped, each batch is read (and on the
    CPU path decoded) by a thread pool, scored in one RunInference element, and written as one
    block of rows. Rows go to a staging folder; the last step commits them (issue 11).

    Args:
        plan: The run's ``transforms.commit.CommitPlan``. Default: a new run into ``--output``.
        bigquery_target: ``--output_table``, resolved and checked (transforms/bigquery.py). Default: none.

    Returns:
        (prediction row blocks, dead-letter rows) PCollections.
    """
    config = preprocess_config(options)
    plan, faults = plan or partitions.make_plan(options), partitions.fault_plan(options)
    batch = handler.images_per_batch
    found = pipeline | "FindImages" >> ImageRefs(options.input, batch_size=batch)
    checked = found["refs"] | "CheckScored" >> CheckScored(plan.skip_root, plan.output, plan.replaces)
    read = checked["refs"] | "ReadBatches" >> beam.ParDo(with_faults(
        ReadImageBatches(config, gpu_decode=decode in ("gpu", "dali_cpu"), threads=options.decode_threads,
                         prefetch=read_prefetch(options, handler),
                         read_timeout_s=options.read_timeout_s or None),
        faults, mid="read", end="decode")).with_outputs(DEAD_LETTER, main="batches")
    main, failed = read.batches | "RunInference" >> RunInference(handler).with_exception_handling()
    scored = main | "TopK" >> beam.ParDo(with_faults(TopKBatches(options.top_k, labels, progress_dir), faults,
                                                     end="inference")).with_outputs(DEAD_LETTER, main="rows")
    failed_rows = failed.failed_inferences | "FailedBatches" >> beam.ParDo(FailedBatchToDeadLetters())
    dead = ((found[DEAD_LETTER], read[DEAD_LETTER], scored[DEAD_LETTER], failed_rows)
            | "AllDeadLetters" >> beam.Flatten()
            | "CountDeadLetters" >> beam.ParDo(CountDeadLetters(progress_dir)))
    partitions.write_and_commit(plan, found, checked, scored.rows, dead, options.output_format, faults,
                                bigquery=bigquery_target)
    return scored.rows, dead


def is_local(options: PipelineOptions) -> bool:
    runner = options.view_as(StandardOptions).runner
    return runner is None or str(runner).split(".")[-1] in LOCAL_RUNNERS


#: Local CPU runs on at least this many cores default to two bundle threads, each with its own
#: ONNX Runtime session on half the cores (benchmarks/NOTES.md: +10-15% on 16 cores, no gain on 2).
PARALLEL_LOCAL_MIN_CORES = 8
_PARALLEL_FLAGS = ("--direct_running_mode", "--direct_num_workers", "--ort_sessions", "--intra_op_threads")


def apply_local_defaults(options: PipelineOptions, argv: Sequence[str]) -> Optional[str]:
    """Sets the measured-fastest local settings for ONNX Runtime on a CPU with many cores.

    One bundle thread feeding one engine leaves most of a large machine idle between batches;
    two bundle threads (``multi_threading`` x2), each taking its own session of half the cores,
    keep the engine busier. Applied only on the DirectRunner, with ``--providers cpu``, on
    :data:`PARALLEL_LOCAL_MIN_CORES` or more cores, and when none of the flags it sets was given.
    Safe with every ``--decode``: the two threads share the loaded model, whose engine serves
    concurrent calls and whose DALI decoders (``dali_cpu``) are lent one per call
    (``engines.dali_decoder.DecoderPool``).

    Returns:
        What was set (for stats.json), or None.
    """
    opts = options.view_as(ClassifyOptions)
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    cores = os.cpu_count() or 1
    if (not is_local(options) or opts.engine != "onnxruntime" or opts.providers.strip().lower() != "cpu"
            or cores < PARALLEL_LOCAL_MIN_CORES or given.intersection(_PARALLEL_FLAGS)):
        return None
    direct = options.view_as(DirectOptions)
    direct.direct_running_mode, direct.direct_num_workers = "multi_threading", 2
    opts.ort_sessions, opts.intra_op_threads = 2, cores // 2
    return (f"{cores} cores: --direct_running_mode=multi_threading --direct_num_workers=2 --ort_sessions 2 "
            f"--intra_op_threads {cores // 2} (pass any of them to choose yourself)")


def run(argv: Optional[List[str]] = None, started: Optional[threading.Event] = None) -> Dict[str, Any]:
    """Parses arguments, runs the job, writes stats.json and stats.png, returns the stats; a run that only
    submits its job (a Flex Template launch) returns its summary instead (pipelines/submission.py).

    Args:
        argv: The command line. Default: ``sys.argv[1:]``.
        started: Set once every start check has passed, just before the pipeline is built and run, so
            a caller can tell a setup mistake (raised before) from a failure of the running job (after):
            :func:`main` exits 2 for the first and 1 for the second. Default: None.
    """
    # ClassifyOptions(argv), not PipelineOptions(argv): only the former lists our flags in --help.
    options = ClassifyOptions(argv)
    opts = options.view_as(ClassifyOptions)
    # Not argparse's required=True: Beam parses every registered options class for every
    # pipeline in the process, so a required flag here would break unrelated pipelines.
    if not opts.input or not opts.output:
        raise UsageError("--input and --output are required (see --help)")
    partitions.resolve_dated_flags(opts)
    partitions.fault_plan(opts)  # the hidden test switch, checked before anything runs
    check_flags(opts)
    launch_checks.check_launch(options, opts, is_local(options))  # versions, worker-readable paths, providers
    check_input(opts.input)
    config = check_setup(opts)
    local_defaults = apply_local_defaults(options, argv if argv is not None else sys.argv[1:])
    if local_defaults:
        _LOG.info("local defaults for %s", local_defaults)
    check_batch(opts, config, is_local(options))
    check_output(opts.output, opts.input)
    # One spelling per folder from here on: the commit, --skip_scored's "the partition this run
    # replaces" and the records compare these (./scored//dt=1, a symlinked root and an absolute
    # path are one partition).
    opts.output = storage.canonical(opts.output)
    if opts.skip_scored:
        opts.skip_scored = storage.canonical(opts.skip_scored)
    local = is_local(options)
    decode, why = resolve_decode(opts, local)
    _LOG.info("decoding on %s (%s)", {"gpu": "the GPU (NVIDIA DALI)", "cpu": "the CPU (Pillow)",
                                     "dali_cpu": "the CPU (NVIDIA DALI)"}[decode], why)
    handler, engine_info, labels = make_handler(opts, decode)
    table = bigquery.resolve_target(opts.output_table, opts.run_date, options, engine_info["engine"],
                                    str(engine_info.get("model") or DEFAULT_MODEL))
    if table:
        _LOG.info("BigQuery table %s (%s): this run replaces its partition %s", table.spec,
                  bigquery.check_table(table, options), table.partition)
    progress_dir = tempfile.mkdtemp(prefix="classify-progress-") if local and opts.progress_every_s > 0 else None
    settings = {
        "input": opts.input, "output": opts.output, "batch_size": handler.images_per_batch,
        "batches_per_call": handler.batch_elements_kwargs()["max_batch_size"], "top_k": opts.top_k,
        "decode": decode, "decode_choice": why,
        "prefetch_batches": read_prefetch(opts, handler),
        "output_format": opts.output_format,
        "runner": str(options.view_as(StandardOptions).runner or "DirectRunner"),
        "direct_running_mode": options.view_as(DirectOptions).direct_running_mode,
        "direct_num_workers": options.view_as(DirectOptions).direct_num_workers,
        "decode_threads": opts.decode_threads,
        "local_defaults": local_defaults,
        "labels": "from model metadata" if labels and not opts.labels_file else (opts.labels_file or None),
        "run_date": opts.run_date, "skip_scored": opts.skip_scored,
        "output_table": table.spec if table else None,
    }
    plan = partitions.make_plan(opts, engine_info, settings)
    _LOG.info("scoring %s -> %s with %s", opts.input, opts.output, engine_info)
    if started is not None:
        started.set()  # the start checks are over: what fails from here on fails a running job
    start = time.monotonic()
    try:
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, opts, handler, labels, progress_dir, decode, plan, table)
        printer = ProgressPrinter(progress_dir, opts.progress_every_s) if progress_dir else contextlib.nullcontext()
        with printer:
            try:
                result = pipeline.run()
                # A Flex Template launch (--template_location) only writes the job object: no wait, no _SUCCESS.
                submitted = submission.wait_unless_submit_only(options, result, opts.output, plan.run_id)
            except Exception as e:
                conflict = partitions.concurrent_commit(plan)
                if conflict is not None:  # the real cause, whatever step noticed it first
                    raise conflict from e
                raise
        wall = time.monotonic() - start
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
    if submitted:
        return submitted
    # The commit step wrote stats.json with the committed counts; add the timing only metrics know.
    committed = partitions.read_committed(opts.output)
    folder = plan.run_folder
    if committed["run_id"] != plan.run_id:
        # This run's commit succeeded (the step raises otherwise), and a run launched after it has
        # already replaced it: report this run's counts from its metrics; its files are gone.
        _LOG.warning("%s was committed by this run (%s) and already replaced by run %s, launched later",
                     opts.output, plan.run_id, committed["run_id"])
        stats = build_stats(collect_metrics(result), wall, None, engine_info, settings)
        stats.update(run={"run_id": plan.run_id, "replaced_by": committed["run_id"]}, stats_file=None,
                     setup_problem=None)
        return stats
    stats = committed_stats(committed, engine_info, settings, collect_metrics(result), wall)
    stats["setup_problem"] = common_failure(partitions.committed_files(opts.output, "dead_letter", committed), stats)
    stats["stats_file"] = storage.join(folder, "stats.json")
    try:
        write_stats(folder, stats)
    except EngineError as e:  # a full disk, say: the partition is committed with the commit step's stats
        _LOG.warning("the run is committed, but adding the timing to its stats.json failed (%s); the committed "
                     "stats.json has the counts", e)
    if stats["unaccounted"]:
        _LOG.error("%d of %d inputs ended as neither a prediction nor a dead letter; please report this with "
                   "stats.json", stats["unaccounted"], stats["inputs"])
    return stats


def per_device(stats: Dict[str, Any]) -> str:
    """" (gpu0 30000, gpu1 29990 images)" when more than one device scored, else ""."""
    devices = stats.get("images_per_device") or {}
    if len(devices) < 2:
        return ""
    return " (" + ", ".join(f"{name} {n}" for name, n in devices.items()) + " images)"


#: Errors raised before the pipeline starts that are setup mistakes: exit status 2, the message names the flag.
SETUP_MISTAKES = (UsageError, EngineError, ImportError)
#: Failures :func:`main` reports in one line without a traceback: setup mistakes, and the engine, a library,
#: the disk or the network failing while the job runs, another run committing the partition first (exit
#: status 1). Any other exception is a bug and keeps its traceback.
EXPECTED_FAILURES = SETUP_MISTAKES + (OSError, MemoryError, CommitConflict)


class _NoTracebackForExpectedFailures(logging.Filter):
    """Keeps Beam's log line of a failed step but drops its traceback when the failure is expected.

    Beam logs every exception a step raises with its traceback before re-raising it
    (``apache_beam.runners.common``); for an expected failure :func:`main` prints the reason itself,
    and the line alone still shows a bundle that failed and was retried.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPECTED_FAILURES):
            record.exc_info = record.exc_text = None
        return True


def _caused_by_expected(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, EXPECTED_FAILURES):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: exit status 0 when the job ran, 2 for a setup mistake found at start, 1 for a
    failure after the job started or when every input failed for one reason (README, "Exit status")."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTracebackForExpectedFailures) for f in handler.filters):
            handler.addFilter(_NoTracebackForExpectedFailures())
    started = threading.Event()
    try:
        stats = run(argv if argv is not None else sys.argv[1:], started)
    except EXPECTED_FAILURES as e:
        if not started.is_set() and isinstance(e, SETUP_MISTAKES):
            print(f"error: {_one_line(e)}", file=sys.stderr)
            return 2
        print(f"error: the job failed{' after it started' if started.is_set() else ''}: {_one_line(e)}",
              file=sys.stderr)
        return 1
    except RuntimeError as e:
        # Beam's runners re-raise a step's exception as a RuntimeError whose message is the original
        # one ("OSError: [Errno 28] ... [while running 'WriteScored/...']"): expected when an expected
        # failure is in its chain, a bug otherwise.
        if not (started.is_set() and _caused_by_expected(e)):
            raise
        print(f"error: the job failed after it started: {_one_line(e)}", file=sys.stderr)
        return 1
    if stats.get("submitted"):
        print(submission.describe(stats))
        return 0
    unlistable = stats.get("unlistable_directories")
    print(f"scored {stats['predictions']} images, {stats['dead_letters']} dead letters"
          f"{f' ({unlistable} of them directories that could not be listed)' if unlistable else ''}, "
          f"{stats['skipped']} skipped as already scored, "
          f"{stats['images_per_second']} images/s{per_device(stats)}; "
          + (f"stats in {stats['stats_file']}" if stats.get("stats_file") else
             f"then replaced by run {stats['run'].get('replaced_by')}"))
    if stats.get("setup_problem"):
        print(f"error: {stats['setup_problem']}; the rows are in {stats['settings']['output']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
