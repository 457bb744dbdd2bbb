"""Score a folder, bucket or manifest of images with an image classifier on Apache Beam.

    python -m pipelines.classify_images --input 'gs://bucket/photos/*.jpg' --output gs://bucket/scored \\
        [--model PATH] [--engine onnxruntime|tensorrt] [--batch_size N] [--top_k K] \\
        [--output_format jsonl|parquet] [any Beam pipeline option: --runner, --direct_num_workers, ...]

Outputs in ``--output``: ``predictions-*.jsonl`` (or ``.parquet``), one row per image
``{"uri", "top_k": [{"class_id", "label", "score"}, ...]}``; ``dead_letter-*.jsonl``
with ``{"uri", "error", "stage"}`` for every input that could not be scored;
``stats.json`` and ``stats.png`` with throughput and per-stage timing; ``_scored-*.jsonl`` (what
was scored, for ``--skip_scored``) and ``_SUCCESS`` (written last by the commit step).
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
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from engines.base import EngineError
from pipelines import partitions
from pipelines.stats import ProgressPrinter, collect_metrics, committed_stats, write_stats
from transforms.faults import with_faults
from transforms.images import DEAD_LETTER, CountDeadLetters, DecodeImages, ImageRefs
from transforms.postprocess import FailedBatchToDeadLetters, TopK
from transforms.preprocess import PreprocessConfig
from transforms.scored import CheckScored
from transforms.sinks import FORMATS

_LOG = logging.getLogger(__name__)

#: Where ``make model`` (python -m engines.export_efficientnet) puts the default model.
DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "models" / "efficientnet_lite0.onnx")
ENGINES = ("onnxruntime", "tensorrt")
DEFAULT_BATCH_SIZE = 32
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
        # Test-only (transforms/faults.py): STAGE:PERCENT:DIR[:always] fails chosen bundles.
        parser.add_argument("--test_faults", default=None, help=argparse.SUPPRESS)
        parser.add_argument("--model", default=None,
                            help=f"ONNX model for --engine onnxruntime (default: the prepared "
                                 f"EfficientNet-Lite0, {DEFAULT_MODEL}).")
        parser.add_argument("--engine", default="onnxruntime", choices=ENGINES, help="Inference engine.")
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
                            help="TensorRT builder timing cache file to reuse and update (local or gs://).")
        parser.add_argument("--batch_size", type=int, default=None,
                            help="Largest batch. Default: 32 for onnxruntime; the profile max for tensorrt.")
        parser.add_argument("--min_batch_size", type=int, default=None,
                            help="Smallest batch formed (the last may be shorter). Default: batch_size for "
                                 "onnxruntime (fixed batches); the profile opt for tensorrt.")
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
        parser.add_argument("--decode_threads", type=int, default=-1,
                            help="Threads per DoFn that read and decode ahead of inference; -1 = the "
                                 "worker's cores (at most 8), 0 = inline. Default: -1.")
        parser.add_argument("--prefetch", type=int, default=None,
                            help="Images read/decoded ahead per DoFn. Default: 2 x batch_size.")
        parser.add_argument("--no_jpeg_draft", action="store_true", help="Decode JPEGs at full size.")
        parser.add_argument("--progress_every_s", type=float, default=5.0,
                            help="Local runs: seconds between progress lines (0 = off). Default 5.")


def make_handler(options: ClassifyOptions) -> Tuple[Any, Dict[str, Any], Optional[List[str]]]:
    """Builds the model handler for --engine (no engine is loaded here).

    Returns:
        (handler, engine description for stats, class names: --labels_file, else the model's
        own metadata or the TensorRT plan's sidecar, else None).
    """
    from engines import storage
    from engines.labels import parse_labels

    explicit_labels = parse_labels(storage.read_bytes(options.labels_file).decode("utf-8")) \
        if options.labels_file else None
    if options.engine == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeLoader
        from transforms.inference import EngineModelHandler

        model = options.model or DEFAULT_MODEL
        batch = options.batch_size or DEFAULT_BATCH_SIZE
        loader = OnnxRuntimeLoader(model, tuple(p.strip() for p in options.providers.split(",") if p.strip()),
                                   options.intra_op_threads, allow_spinning=options.ort_spinning in ("on", "run"),
                                   sessions=options.ort_sessions,
                                   stop_spinning_after_run=options.ort_spinning == "run")
        # Fixed batches (min = max): Beam's adaptive sizing settled near 14 at max 32 and cost 13% of
        # throughput on 16 cores (benchmarks/NOTES.md). The bundle's last batch may still be shorter.
        handler = EngineModelHandler(loader, min_batch_size=options.min_batch_size or batch,
                                     max_batch_size=batch, share_across_processes=options.share_model_across_processes,
                                     model_copies=options.model_copies, metrics_namespace="onnxruntime",
                                     model_id=model)
        info = {"engine": "onnxruntime", "model": model, "providers": list(loader.providers),
                "ort_spinning": options.ort_spinning, "ort_sessions": options.ort_sessions,
                "intra_op_threads": options.intra_op_threads}
        return handler, info, explicit_labels or _labels(_onnx_summary(model))
    from transforms.tensorrt_handler import TensorRTModelHandler

    if not (options.engine_path or options.onnx_path):
        raise EngineError("--engine tensorrt needs --engine_path PLAN (built by `python -m engines.build`) or "
                          "--onnx_path MODEL.onnx (built on the workers, cached in --engine_cache)")
    handler = TensorRTModelHandler.from_options(options, min_batch_size=options.min_batch_size)
    labels = explicit_labels or handler.labels() or (
        _labels(_onnx_summary(options.onnx_path)) if options.onnx_path else None)
    return handler, {**handler.describe_engine(), "model": options.engine_path or options.onnx_path}, labels


@functools.lru_cache(maxsize=2)
def _onnx_summary(path: str):
    """Labels and named I/O of an ONNX model (read once per launcher, local or gs://)."""
    from engines import storage
    from engines.onnx_summary import summarize_onnx

    return summarize_onnx(storage.read_bytes(path))


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
        raise EngineError(f"bad preprocessing flags: {e} (see --resize, --crop, --max_pixels)") from None


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
    summary = _onnx_summary(model)
    outputs = [name for name, _, _ in summary.outputs]
    if options.output_name not in outputs:
        raise EngineError(f"--output_name {options.output_name!r} is not an output of {model}; its outputs are "
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
        raise EngineError(f"--crop {config.crop} does not fit {model}: its input {name!r} is {list(dims)}; pass "
                          f"--crop {fixed[0]} (and --resize >= {fixed[0]})")
    return config


def check_input(path: str) -> None:
    """Fails fast when the input matches nothing (a broken setup, not a bad record)."""
    from apache_beam.io.filesystems import FileSystems

    from transforms.images import has_glob, is_manifest, normalize_pattern

    pattern = path if is_manifest(path) else normalize_pattern(path)
    try:
        matched = FileSystems.match([pattern], limits=[1])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError and friends
        raise EngineError(f"Cannot list --input {path}: {e}") from e
    if not matched:
        hint = (" A folder in a bucket needs a trailing slash (gs://bucket/dir/) or a glob (gs://bucket/dir/*.jpg)."
                if "://" in path and not path.endswith("/") and not has_glob(path) else "")
        raise EngineError(f"--input {path} matches no files; check the path or glob (quote it in the shell).{hint}")


def build_pipeline(pipeline: beam.Pipeline, options: ClassifyOptions, handler, labels,
                   progress_dir: Optional[str] = None, plan=None):
    """Adds the scoring transforms to ``pipeline``, ending with the commit of ``--output``.

    Args:
        plan: The run's ``transforms.commit.CommitPlan``. Default: a new run into ``--output``.

    Returns:
        (prediction rows, dead-letter rows) PCollections.
    """
    config = preprocess_config(options)
    plan, faults = plan or partitions.make_plan(options), partitions.fault_plan(options)
    found = pipeline | "FindImages" >> ImageRefs(options.input)
    checked = found["refs"] | "CheckScored" >> CheckScored(plan.skip_root, plan.output)
    decoded = checked["refs"] | "ReadDecode" >> beam.ParDo(with_faults(
        DecodeImages(config, options.decode_threads,
                     options.prefetch or 2 * handler.batch_elements_kwargs()["max_batch_size"]),
        faults, mid="read", end="decode")).with_outputs(DEAD_LETTER, main="images")
    main, failed = (decoded.images
                    | "RunInference" >> RunInference(KeyedModelHandler(handler)).with_exception_handling())
    predictions = main | "TopK" >> beam.ParDo(with_faults(TopK(options.top_k, labels, options.output_name,
                                                                progress_dir), faults, end="inference"))
    failed_rows = failed.failed_inferences | "FailedBatches" >> beam.ParDo(FailedBatchToDeadLetters())
    dead = ((found[DEAD_LETTER], decoded[DEAD_LETTER], failed_rows) | "AllDeadLetters" >> beam.Flatten()
            | "CountDeadLetters" >> beam.ParDo(CountDeadLetters(progress_dir)))
    partitions.write_and_commit(plan, found, checked, predictions, dead, options.output_format, faults)
    return predictions, dead


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


def run(argv: Optional[List[str]] = None, save_main_session: bool = False) -> Dict[str, Any]:
    """Parses arguments, runs the job, writes stats.json and stats.png, returns the stats."""
    # ClassifyOptions(argv), not PipelineOptions(argv): only the former lists our flags in --help.
    options = ClassifyOptions(argv)
    opts = options.view_as(ClassifyOptions)
    # Not argparse's required=True: Beam parses every registered options class for every
    # pipeline in the process, so a required flag here would break unrelated pipelines.
    if not opts.input or not opts.output:
        raise EngineError("--input and --output are required (see --help)")
    partitions.resolve_dated_flags(opts)
    if (opts.batch_size is not None and opts.batch_size < 1) or opts.top_k < 1:
        raise EngineError(f"--batch_size and --top_k must be >= 1, got {opts.batch_size} and {opts.top_k}")
    check_input(opts.input)
    check_setup(opts)
    local_defaults = apply_local_defaults(options, argv if argv is not None else sys.argv[1:])
    if local_defaults:
        _LOG.info("local defaults for %s", local_defaults)
    handler, engine_info, labels = make_handler(opts)
    batching = handler.batch_elements_kwargs()
    local = is_local(options)
    progress_dir = tempfile.mkdtemp(prefix="classify-progress-") if local and opts.progress_every_s > 0 else None
    settings = {
        "input": opts.input, "output": opts.output, "batch_size": batching["max_batch_size"],
        "min_batch_size": batching["min_batch_size"], "top_k": opts.top_k,
        "output_format": opts.output_format,
        "runner": str(options.view_as(StandardOptions).runner or "DirectRunner"),
        "direct_running_mode": options.view_as(DirectOptions).direct_running_mode,
        "direct_num_workers": options.view_as(DirectOptions).direct_num_workers,
        "decode_threads": opts.decode_threads,
        "local_defaults": local_defaults,
        "labels": "from model metadata" if labels and not opts.labels_file else (opts.labels_file or None),
        "run_date": opts.run_date, "skip_scored": opts.skip_scored,
    }
    plan = partitions.make_plan(opts, engine_info, settings)
    _LOG.info("scoring %s -> %s with %s", opts.input, opts.output, engine_info)
    start = time.monotonic()
    try:
        pipeline = beam.Pipeline(options=options)
        build_pipeline(pipeline, opts, handler, labels, progress_dir, plan)
        printer = ProgressPrinter(progress_dir, opts.progress_every_s) if progress_dir else contextlib.nullcontext()
        with printer:
            result = pipeline.run()
            result.wait_until_finish()
        wall = time.monotonic() - start
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
    # The commit step wrote stats.json with the committed counts; add the timing only metrics know.
    committed = partitions.read_committed(opts.output)
    if committed["run_id"] != plan.run_id:
        raise EngineError(f"{opts.output} was committed by run {committed['run_id']}, not this run ({plan.run_id}): "
                          f"two runs wrote it at once; rerun one of them")
    stats = committed_stats(committed, engine_info, settings, collect_metrics(result), wall)
    write_stats(opts.output, stats)
    if stats["unaccounted"]:
        _LOG.error("%d of %d inputs ended as neither a prediction nor a dead letter; please report this with "
                   "stats.json", stats["unaccounted"], stats["inputs"])
    return stats


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    try:
        stats = run(argv if argv is not None else sys.argv[1:])
    except (EngineError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"scored {stats['predictions']} images, {stats['dead_letters']} dead letters, "
          f"{stats['skipped']} skipped as already scored, "
          f"{stats['images_per_second']} images/s; stats in {os.path.join(stats['settings']['output'], 'stats.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
