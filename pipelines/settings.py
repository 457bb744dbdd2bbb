"""The job's settings: every flag parsed, checked and resolved once, by :func:`resolve`.

``resolve(argv)`` returns a frozen :class:`RunSettings` and the Beam ``PipelineOptions`` the job
runs with. Everything downstream (the reader, the model handler, the sinks, stats.json) reads the
settings; nothing rewrites an option, so the order of the steps after it cannot change what any
step sees. What ``resolve`` decides, in this order:

1. the flags as typed (:class:`ClassifyOptions`: the pipeline's own here, each engine's from its
   module through ``pipelines/engine_registry.py``), ``{date}`` filled from ``--run_date``, every
   numeric flag range-checked;
2. the local-runner defaults (:func:`local_defaults`), computed into the options the job runs with
   (a new ``PipelineOptions``, built once with them), not written into the parsed ones;
3. the start checks that read the machine and the files (versions and worker paths, ``--input``,
   the model against the preprocessing, the batch against the model and memory, ``--output``);
4. where images are decoded (:func:`resolve_decode`), the engine's recipe and batch size, the
   class names, and from them the batch grouping (:class:`BatchSettings`) and the decoder
   (:class:`DecodeSettings`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from engines import storage
from engines.base import EngineError, EngineRecipe, UsageError
from engines.flags import BATCH_WHY, MAX_BATCH, MAX_COPIES, MAX_THREADS, THREADS_WHY, FlagRange, check_ranges
from images.dali_decoder import DaliDecoderOptions
from images.pillow_decoder import PreprocessConfig
from images.reading import DEFAULT_READ_TIMEOUT_S
from pipelines import engine_registry, launch_checks, model_settings, partitions
from pipelines.model_settings import ModelSettings
from transforms import bigquery
from transforms.images import ManifestError, resolve_keep_columns, split_keep_columns
from transforms.postprocess import RowLayout
from transforms.sinks import FORMATS, prediction_schema

_LOG = logging.getLogger(__name__)

DECODE_MODES = ("auto", "gpu", "cpu", "dali_cpu")
#: Decode modes whose images the pre-screen passes travel encoded to a DALI decoder beside the engine.
DALI_MODES = ("gpu", "dali_cpu")
#: DALI decoders per loaded model, each on a thread of its own serving every bundle thread. When callers
#: borrowed one per call, four DALI pipelines contended with each other and the engine (H200: 1,536 images/s
#: against 2,944 for one taken in turns, benchmarks/results/h200-concurrency.json); one is the default.
DEFAULT_MAX_DECODERS = 1
#: Batches per inference call with a DALI decoder: each call decodes batch k+1 while the engine runs
#: batch k, so only a call's first batch waits for its decode.
GPU_DECODE_BATCHES_PER_CALL = 4
#: Runners whose workers run in the launching process (with an in-process ``--direct_running_mode``).
IN_PROCESS_RUNNERS = ("DirectRunner", "direct", "SwitchingDirectRunner", "FnApiRunner", "BundleBasedDirectRunner")
LOCAL_RUNNERS = ("DirectRunner", "direct", "PrismRunner", "prism", "BundleBasedDirectRunner",
                 "SwitchingDirectRunner", "FnApiRunner")

#: Longest time limit or interval: a read stalled for a day is stuck, not slow, and
#: threading's waits raise OverflowError past threading.TIMEOUT_MAX, which is what inf or 1e12 did midway.
MAX_SECONDS = 86_400
#: Most batches read ahead per DoFn (--prefetch): they wait in memory, and 1024 batches of 32 images are
#: already 4.6 GiB of pixels per DoFn; 2 to 8 keep the engine fed.
MAX_PREFETCH = 1024
#: Largest --max_pixels: an image of 2**32 pixels decodes to 12 GiB of RGB in one thread.
MAX_PIXELS = 1 << 32
#: Most classes per image: the largest public label sets have about 22,000 (ImageNet-21k), and every
#: class is an entry in every prediction row.
MAX_TOP_K = 100_000

_SECONDS_WHY = "a day: beyond it a stall is a stuck read or a typo"
#: Bounds of the pipeline's own numeric flags; each engine lists its own (``engines/flags.py``). Every
#: numeric flag has a lower and an upper bound: inf, nan or a huge value is a typo that would otherwise fail
#: on a worker (a timeout past threading's limit overflows) or exhaust memory there.
FLAG_RANGES = (
    FlagRange("--batch_size", "batch_size", 1, MAX_BATCH, BATCH_WHY),
    FlagRange("--top_k", "top_k", 1, MAX_TOP_K, "more classes than the largest public label sets"),
    FlagRange("--decode_threads", "decode_threads", -1, MAX_THREADS, THREADS_WHY),
    FlagRange("--dali_threads", "dali_threads", -1, MAX_THREADS, THREADS_WHY),
    FlagRange("--prefetch", "prefetch", 1, MAX_PREFETCH, "prefetched batches wait in memory"),
    FlagRange("--read_timeout_s", "read_timeout_s", 0, MAX_SECONDS, _SECONDS_WHY),
    FlagRange("--progress_every_s", "progress_every_s", 0, MAX_SECONDS, _SECONDS_WHY),
    FlagRange("--model_copies", "model_copies", 1, MAX_COPIES, "one copy per GPU"),
    FlagRange("--max_pixels", "max_pixels", 1, MAX_PIXELS, "such an image decodes to 12 GiB in one thread"),
    FlagRange("--hw_decoder_load", "hw_decoder_load", 0, 1, "a share of the JPEG work"),
    FlagRange("--max_decoders", "max_decoders", 1, MAX_THREADS, "each decoder holds GPU memory and CPU threads"),
)


class ClassifyOptions(PipelineOptions):
    """Command-line options of ``pipelines.classify_images`` (every Beam option works too).

    The pipeline's own flags are here; each engine's come from its module (``add_flags``, through
    :func:`pipelines.engine_registry.add_flags`).
    """

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
        parser.add_argument("--keep_columns", default=None, metavar="NAME,NAME",
                            help="Columns of a .csv/.jsonl --input manifest to copy into every prediction and "
                                 "dead-letter row, after uri and id (values as text; null where an entry has "
                                 "none). Default: all of the manifest's columns other than uri and id; \"\" for "
                                 "none.")
        parser.add_argument("--output", default=None,
                            help="Output directory (local or gs://...), replaced as a whole by each run "
                                 "(committed with a _SUCCESS file). {date} is replaced by --run_date.")
        parser.add_argument("--run_date", default=None,
                            help="The run's date, YYYY-MM-DD, 'today' or 'yesterday' (UTC); fills {date} in "
                                 "--input and --output. Default: today (UTC).")
        parser.add_argument("--skip_scored", default=None, metavar="ROOT",
                            help="Skip inputs already scored by a committed run under ROOT (same URI, size and "
                                 "modification time); changed files are scored again. Default: score all.")
        parser.add_argument("--batch_size", type=int, default=None,
                            help="Largest batch. Default: 32 for onnxruntime; the profile max for tensorrt.")
        parser.add_argument("--share_model_across_processes", action="store_true",
                            help="One engine copy per worker machine instead of one per process.")
        parser.add_argument("--model_copies", type=int, default=1,
                            help="With --share_model_across_processes: copies per machine (e.g. one per GPU).")
        parser.add_argument("--top_k", type=int, default=5, help="Classes per image. Default: 5.")
        parser.add_argument("--output_format", default="jsonl", choices=FORMATS,
                            help="Predictions format. Default: jsonl.")
        parser.add_argument("--labels_file", default=None,
                            help="Class names, one per line or a JSON list (default: the model's 'labels' "
                                 "metadata, if any).")
        parser.add_argument("--resize", type=int, default=None,
                            help="Shorter side before the centre crop. Default: the crop's longer side x 256/224 "
                                 "(256 for 224).")
        parser.add_argument("--crop", default=None, metavar="SIZE",
                            help="Centre crop, the model's input: 224 (square) or 240x320 (height x width). "
                                 "Default: the model's input size, else 224.")
        parser.add_argument("--max_pixels", type=int, default=PreprocessConfig.max_pixels,
                            help="Refuse larger images (decompression bombs). Default: 89478485.")
        parser.add_argument("--decode", default="auto", choices=DECODE_MODES,
                            help="Where images are decoded: gpu (NVIDIA DALI on the engine's GPU; files the "
                                 "header pre-screen does not pass still decode on the CPU), cpu (Pillow), "
                                 "dali_cpu (the DALI graph on the CPU: CI and debugging), auto (gpu where a CUDA "
                                 "device and DALI are present, else cpu). Default: auto.")
        parser.add_argument("--hw_decoder_load", type=float, default=DaliDecoderOptions.hw_decoder_load,
                            help="--decode gpu: share of JPEG work for the GPU's hardware JPEG decoder where it has "
                                 "one (0..1). Default: 0.65.")
        parser.add_argument("--dali_threads", type=int, default=-1,
                            help="--decode gpu/dali_cpu: DALI's CPU threads (JPEG parsing and Huffman decoding for "
                                 "the GPU, non-JPEG formats); -1 = the cores of the machine each decoder runs on, at "
                                 "most 16, shared among a local run's decoders (one per multi_processing process, or "
                                 "per --model_copies copy) (throughput by threads: README, \"On a GPU\"). "
                                 "Default: -1.")
        parser.add_argument("--max_decoders", type=int, default=DEFAULT_MAX_DECODERS,
                            help="--decode gpu/dali_cpu: DALI decoders per loaded model, each on a thread of its "
                                 "own decoding the batches of every bundle thread that shares the model "
                                 "(--direct_running_mode multi_threading, Dataflow's harness threads) while their "
                                 "engine calls run. Each holds its own DALI pipeline in GPU memory and "
                                 "--dali_threads CPU threads. Default: 1 (README, \"On a GPU\").")
        parser.add_argument("--decode_threads", type=int, default=-1,
                            help="Threads per DoFn that read (and on the CPU path decode) ahead of inference; "
                                 "-1 = the worker's cores (at most 16), 0 = inline. Default: -1.")
        parser.add_argument("--prefetch", type=int, default=None,
                            help="Batches read ahead per DoFn while the engine runs the current ones. Default: "
                                 "twice the batches per inference call (8 with GPU decode, else 2).")
        parser.add_argument("--no_score_ahead", action="store_true",
                            help="Score each batch only when RunInference reaches it, not as soon as its files are "
                                 "read (the reader's threads then start it on the worker's loaded model while the "
                                 "bundle thread makes and writes the rows of earlier batches). Default: ahead.")
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
        model_settings.add_flags(parser)
        bigquery.add_flags(parser)
        engine_registry.add_flags(parser)


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    """How images are grouped, decided once: the reader, the model handler and the decoder read it.

    The fields carry the names their consumers' arguments have.

    Attributes:
        images_per_batch: What ``ImageRefs`` groups, ``ReadImageBatches`` reads, the engine runs and
            a DALI decoder is sized for (``--batch_size``, fitted to the model, or the engine's own
            choice).
        batches_per_call: Batches per ``RunInference`` call (what Beam calls the handler's
            ``max_batch_size``): :data:`GPU_DECODE_BATCHES_PER_CALL` with a DALI decoder, else 1.
        prefetch: Batches each reader reads ahead: ``--prefetch``, else twice ``batches_per_call``.
        score_ahead: Whether a batch starts scoring as soon as it is read (``transforms.ahead``), rather
            than when ``RunInference`` reaches it: not ``--no_score_ahead``, and not with
            ``--share_model_across_processes`` (the model is then in another process).
    """

    images_per_batch: int
    batches_per_call: int
    prefetch: int
    score_ahead: bool = True

    def __post_init__(self):
        if self.images_per_batch < 1 or self.batches_per_call < 1 or self.prefetch < 1:
            raise ValueError(f"images_per_batch, batches_per_call and prefetch must be >= 1, got "
                             f"{self.images_per_batch}, {self.batches_per_call}, {self.prefetch}")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """Where images are decoded, decided once from ``--decode`` (and, for ``auto``, the engine and this machine).

    Attributes:
        mode: ``cpu`` (Pillow, in the reader), ``gpu`` (DALI on the engine's GPU) or ``dali_cpu``
            (the DALI graph on the CPU).
        why: Why this mode, for the log and stats.json.
        dali: The DALI decoder's options with ``gpu`` and ``dali_cpu``; None with ``cpu``.
        max_decoders: DALI decoders per loaded model (``--max_decoders``).
    """

    mode: str
    why: str
    dali: Optional[DaliDecoderOptions] = None
    max_decoders: int = DEFAULT_MAX_DECODERS

    @property
    def encoded(self) -> bool:
        """Images the header pre-screen passes travel encoded to a DALI decoder beside the engine."""
        return self.dali is not None


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Everything a run needs from its command line, resolved once by :func:`resolve`.

    Attributes:
        input: ``--input`` with ``{date}`` filled.
        output: ``--output`` with ``{date}`` filled, in its one canonical spelling (the commit,
            ``--skip_scored`` and the records compare it).
        run_date: The run's date, ``YYYY-MM-DD``.
        skip_scored: ``--skip_scored``, canonical, or None.
        engine: ``--engine``.
        recipe: The engine's recipe (loader, batch size, description, where its labels come from).
        labels: Class names (``--labels_file``, else the model's or plan's own), or None.
        labels_file: ``--labels_file``, or None.
        preprocess: The preprocessing (``--resize``, ``--crop``, ``--max_pixels``, ``--no_jpeg_draft``).
        batch: How images are grouped (:class:`BatchSettings`).
        decode: Where images are decoded (:class:`DecodeSettings`).
        read_threads: ``--decode_threads``: reader threads per DoFn, -1 = the worker's cores.
        read_timeout_s: ``--read_timeout_s``, None for no limit.
        top_k: ``--top_k``.
        output_format: ``--output_format``.
        model: The model: its input and preprocessing, how its outputs become rows, its identity
            (``pipelines.model_settings.ModelSettings``).
        rows: What each prediction row holds (``transforms.postprocess.RowLayout``).
        share_model_across_processes: ``--share_model_across_processes``.
        model_copies: ``--model_copies``.
        local: The runner runs here (DirectRunner, Prism).
        local_defaults: What :func:`local_defaults` chose, as a line for stats.json, or None.
        runner: The runner's name.
        direct_running_mode: The DirectRunner's running mode (local defaults applied).
        direct_num_workers: The DirectRunner's workers (local defaults applied).
        progress_every_s: ``--progress_every_s``.
        bigquery: ``--output_table``, resolved and checked (``transforms.bigquery.BigQueryTarget``), or
            None: files only.
        keep_columns: The manifest columns every row carries (``--keep_columns``, resolved against the
            manifest by :func:`kept_columns`); () for none.
    """

    input: str
    output: str
    run_date: str
    skip_scored: Optional[str]
    engine: str
    recipe: EngineRecipe
    labels: Optional[Tuple[str, ...]]
    labels_file: Optional[str]
    preprocess: PreprocessConfig
    batch: BatchSettings
    decode: DecodeSettings
    read_threads: int
    read_timeout_s: Optional[float]
    top_k: int
    output_format: str
    model: ModelSettings
    rows: RowLayout
    share_model_across_processes: bool
    model_copies: int
    local: bool
    local_defaults: Optional[str]
    runner: str
    direct_running_mode: str
    direct_num_workers: int
    progress_every_s: float
    bigquery: Optional[bigquery.BigQueryTarget] = None
    keep_columns: Tuple[str, ...] = ()

    @property
    def workers_in_process(self) -> bool:
        """The runner's workers run in this process and load the model here: the DirectRunner's ``in_memory``
        and ``multi_threading`` modes, with a model of their own (not one shared across processes)."""
        return (self.runner.split(".")[-1] in IN_PROCESS_RUNNERS
                and self.direct_running_mode in ("in_memory", "multi_threading")
                and not self.share_model_across_processes)

    def engine_record(self) -> Dict[str, Any]:
        """The engine's description for stats.json and the logs (a new dict each call)."""
        if self.decode.encoded:
            return {**self.recipe.info, "decode": self.decode.mode,
                    "hw_decoder_load": self.decode.dali.hw_decoder_load if self.decode.mode == "gpu" else None,
                    "dali_threads": self.decode.dali.threads or "each worker's cores, at most 16"}
        return {**self.recipe.info, "decode": "cpu"}

    def record(self) -> Dict[str, Any]:
        """The settings section of stats.json (a new dict each call)."""
        return {
            "input": self.input, "output": self.output, "batch_size": self.batch.images_per_batch,
            "batches_per_call": self.batch.batches_per_call,
            "top_k": self.top_k if self.rows.mode == "topk" else None,  # --threshold and raw rows rank no k
            "decode": self.decode.mode, "decode_choice": self.decode.why,
            "prefetch_batches": self.batch.prefetch,
            "score_ahead": self.batch.score_ahead,
            "output_format": self.output_format,
            "runner": self.runner,
            "direct_running_mode": self.direct_running_mode,
            "direct_num_workers": self.direct_num_workers,
            "decode_threads": self.read_threads,
            "local_defaults": self.local_defaults,
            "labels": "from model metadata" if self.labels and not self.labels_file else (self.labels_file or None),
            "run_date": self.run_date, "skip_scored": self.skip_scored,
            "output_table": self.bigquery.spec if self.bigquery else None,
            "model": self.model.record(),
            "keep_columns": list(self.keep_columns),
        }


def runner_name(options: PipelineOptions) -> str:
    """The runner's name without its module ("DirectRunner" when none is named, Beam's default)."""
    return str(options.view_as(StandardOptions).runner or "DirectRunner").split(".")[-1]


def is_local(options: PipelineOptions) -> bool:
    """The runner runs on this machine (DirectRunner, Prism; also when no runner is named)."""
    return runner_name(options) in LOCAL_RUNNERS


def check_flags(options: ClassifyOptions) -> None:
    """Fails at start on flag values out of range, naming the flag (not a traceback midway): the
    pipeline's (:data:`FLAG_RANGES`) and every engine's, whatever ``--engine`` is.

    Non-numbers for whole-number flags are refused by argparse before this runs.

    Raises:
        UsageError: naming the flag, the value and the accepted range.
    """
    check_ranges(options, FLAG_RANGES)
    check_ranges(options, model_settings.FLAG_RANGES)
    if options.crop is not None:
        model_settings.parse_crop(options.crop)
    if options.model_copies > 1 and not options.share_model_across_processes:
        raise UsageError("--model_copies > 1 needs --share_model_across_processes (one copy per GPU)")
    engine_registry.check_flags(options)


def local_defaults(options: ClassifyOptions, argv: Sequence[str], local: bool) -> Tuple[Dict[str, Any], Optional[str]]:
    """The measured-fastest settings for this machine, for flags the user left out.

    The engine says what it runs fastest with here (``cli_local_defaults``; ONNX Runtime on a CPU
    of many cores: two sessions on half the cores each); when that is several concurrent callers,
    the DirectRunner runs that many bundle threads (``multi_threading``). Applied only to local
    runs, and only when none of the flags it would set was given. Safe with every ``--decode``:
    the threads share the loaded model, whose engine serves concurrent calls and whose DALI
    decoders serve every caller's batches from a thread of their own (``images.decoder_service``).

    Nothing is written into ``options``: :func:`resolve` builds the job's options with the values.

    Returns:
        (option name -> value, one line saying what was chosen for the log and stats.json), or
        ({}, None) when nothing was chosen.
    """
    if not local:
        return {}, None
    cores = os.cpu_count() or 1
    chosen = engine_registry.local_defaults(options, cores)
    if chosen is None:
        return {}, None
    values = dict(chosen.values)
    runner_flags = ""
    if chosen.callers > 1:
        values.update(direct_running_mode="multi_threading", direct_num_workers=chosen.callers)
        runner_flags = f"--direct_running_mode=multi_threading --direct_num_workers={chosen.callers} "
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    if given.intersection(f"--{name}" for name in values):
        return {}, None
    return values, f"{cores} cores: {runner_flags}{chosen.shown} (pass any of them to choose yourself)"


def resolve_decode(options: ClassifyOptions, local: bool) -> Tuple[str, str]:
    """Where images are decoded, and why (logged in one line, recorded in stats.json).

    ``auto`` is ``gpu`` when the engine runs on a GPU and, for a local run, DALI and a CUDA
    device are present here; for a remote runner the workers' GPUs and the worker image's DALI
    are assumed (the Dockerfile installs it). Never a silent fall-back: an explicit ``gpu``
    that cannot work stops the job at start.

    Raises:
        UsageError: ``--decode gpu`` with an engine on the CPU, or locally without DALI or a GPU.
    """
    from images.dali_decoder import gpu_decode_unavailable

    mode = options.decode
    if mode in ("cpu", "dali_cpu"):
        return mode, "asked for"
    on_gpu = engine_registry.on_gpu(options)
    if mode != "gpu" and not on_gpu:
        return "cpu", "auto: the engine runs on the CPU"  # without importing DALI (0.4 s of a launch)
    missing = gpu_decode_unavailable() if local else None
    if mode == "gpu":
        if not on_gpu:
            raise UsageError("--decode gpu feeds decoded images on the GPU to the engine, which runs on the CPU "
                             "here: add --providers cuda (or --engine tensorrt), or pass --decode cpu")
        if missing:
            raise UsageError(f"--decode gpu cannot run here: {missing}. Install the gpu extra "
                             f"(pip install -e '.[gpu]') on a CUDA machine, or pass --decode cpu")
        return "gpu", "asked for"
    if missing:
        return "cpu", f"auto: {missing}"
    return "gpu", "auto: the engine runs on a GPU and DALI is present" if local else \
        "auto: the engine runs on the workers' GPUs (the worker image carries DALI)"


def preprocess_config(options: ClassifyOptions, model: Optional[ModelSettings] = None) -> PreprocessConfig:
    """The preprocessing the flags ask for: the crop and the resize follow the model's input unless given.

    Args:
        options: The parsed options.
        model: The model's settings (its input size), or None: the flags and the defaults alone.

    Raises:
        UsageError: sizes that cannot work together, naming the flags.
    """
    (height, width), resize, why = model_settings.crop_and_resize(options, model.input_size() if model else None)
    _LOG.info("preprocessing: %s", why)
    try:
        return PreprocessConfig(resize=resize, crop=height, max_pixels=options.max_pixels,
                                draft=not options.no_jpeg_draft, crop_width=width if width != height else None)
    except ValueError as e:
        raise UsageError(f"bad preprocessing flags: {e} (see --resize, --crop, --max_pixels)") from None


def read_labels(path: str) -> List[str]:
    """Class names from ``--labels_file`` (one per line or a JSON list, UTF-8).

    Raises:
        EngineError: missing, unreadable or not UTF-8, or holding no names, naming the flag.
    """
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


def _engine_labels(recipe: EngineRecipe, summaries: Dict[str, Any]) -> Optional[Tuple[str, ...]]:
    """The names the engine artefact carries (a plan's sidecar), else its ONNX model's metadata, else None.

    Args:
        recipe: The engine's recipe.
        summaries: Model path -> ``engines.onnx_summary.OnnxSummary`` of models read already.
    """
    from engines.onnx_summary import read_summary

    if recipe.labels:
        return tuple(recipe.labels)
    if recipe.labels_model:
        summary = summaries.get(recipe.labels_model) or read_summary(recipe.labels_model, recipe.labels_flag)
        labels = summary.labels
        return tuple(labels) if labels is not None else None
    return None


def dali_threads(options: ClassifyOptions, local: bool) -> int:
    """DALI's CPU threads per decoder: ``--dali_threads``; for -1, 0 where the workers run on other machines (each
    decoder then takes the cores of the machine it is built on, at most 16: ``DaliDecoderOptions.threads_here``;
    this machine's cores say nothing of a worker's), else this machine's cores, at most 16 a decoder, shared evenly
    among the decoders of a local run: one per SDK process (DirectRunner ``multi_processing``), or one per model copy
    when the model is shared across processes (``--model_copies``)."""
    if options.dali_threads > 0:
        return options.dali_threads
    if not local:
        return 0
    cores = os.cpu_count() or 1
    decoders = 1
    direct = options.view_as(DirectOptions)
    if options.share_model_across_processes:
        decoders = options.model_copies
    elif runner_name(options) in IN_PROCESS_RUNNERS and direct.direct_running_mode == "multi_processing":
        decoders = direct.direct_num_workers or cores  # Beam: 0 means one per core
    return min(16, max(1, cores // max(1, decoders)))


def _decoder(mode: str, options: ClassifyOptions, preprocess: PreprocessConfig,
             images_per_batch: int, local: bool) -> Optional[DaliDecoderOptions]:
    """The DALI decoder's options for ``mode`` (None with ``cpu``).

    Raises:
        UsageError: decoder flags DALI cannot take, naming them.
    """
    if mode not in DALI_MODES:
        return None
    try:
        return DaliDecoderOptions(resize=preprocess.resize, crop=preprocess.crop, crop_width=preprocess.crop_width,
                                  max_batch=images_per_batch,
                                  device="gpu" if mode == "gpu" else "cpu", hw_decoder_load=options.hw_decoder_load,
                                  threads=dali_threads(options, local))
    except EngineError as e:
        raise UsageError(f"bad decode flags: {e} (see --hw_decoder_load, --dali_threads, --batch_size)") from None


def kept_columns(options: ClassifyOptions, start_checks: bool, outputs: Sequence[str] = ()) -> Tuple[str, ...]:
    """The manifest columns the run's rows carry (``--keep_columns``), decided once.

    With the start checks, resolved against the manifest (``transforms.images.resolve_keep_columns``:
    default all its columns other than uri and id); a column named like a field of the rows (``outputs``,
    the raw outputs' fields, and the BigQuery run columns when ``--output_table`` is set, included) is
    refused. Without them the manifest is not read: the names the flag gives, or none.

    Raises:
        UsageError: the flag or the manifest's columns cannot work, saying what to change.
    """
    try:
        if not start_checks:
            return split_keep_columns(options.keep_columns) or ()
        reserved = tuple(column["name"] for column in bigquery.RUN_COLUMNS) if options.output_table else ()
        return resolve_keep_columns(options.input, options.keep_columns, reserved + tuple(outputs))
    except ManifestError as e:
        raise UsageError(str(e)) from None


def resolve(argv: Sequence[str], *, start_checks: bool = True) -> Tuple[RunSettings, ClassifyOptions]:
    """Parses, checks and resolves the command line, once.

    Args:
        argv: The command line (without the program name).
        start_checks: Run the checks that read this machine and the files the flags name (versions
            and worker paths, ``--input``, the model against the preprocessing, the batch size
            against the model and this machine's memory, ``--output``). Default True; False is for
            tools and tests that build a job from its flags alone (a model with a fixed batch
            dimension is then not fitted).

    Returns:
        (the run's settings, the Beam options the job runs with: the parsed ones with ``{date}``
        filled and the local defaults applied, built once and never changed after).

    Raises:
        UsageError: a flag that cannot work, naming it and the fix (also what argparse refuses,
            through ``SystemExit``).
        EngineError: a model, labels file or engine artefact that cannot be used.
        ImportError: a library the chosen engine or decoder needs here is missing.
    """
    argv = list(argv)
    # ClassifyOptions(argv), not PipelineOptions(argv): only the former lists our flags in --help.
    typed = ClassifyOptions(argv)
    # Not argparse's required=True: Beam parses every registered options class for every
    # pipeline in the process, so a required flag here would break unrelated pipelines.
    if not typed.input or not typed.output:
        raise UsageError("--input and --output are required (see --help)")
    dated = partitions.dated_flags(typed)
    check_flags(typed)
    local = is_local(typed)
    defaults, defaults_note = local_defaults(typed, argv, local)
    options = ClassifyOptions(argv, **dated, **defaults)
    if start_checks:
        launch_checks.check_launch(options, options, local)  # versions, worker-readable paths, providers
        launch_checks.check_input(options.input)
    model_file = engine_registry.model_file(options)
    loaded = model_settings.read_model(model_file, read=start_checks)  # the one read of the model at launch
    # The model's input, outputs and identity: what the crop, the loader and the rows follow.
    model = model_settings.resolve_model(options, model_file,
                                         engine_registry.built_model(options) if model_file is None else None,
                                         read=start_checks, loaded=loaded)
    _LOG.info("model %s: %s", model.identity, model.record())
    keep_columns = kept_columns(options, start_checks, model.output_names if model.output_mode == "raw" else ())
    preprocess = preprocess_config(options, model)
    summary = loaded.summary if start_checks and loaded is not None else None
    if defaults_note:
        _LOG.info("local defaults for %s", defaults_note)
    batch_size = options.batch_size
    if summary is not None:
        batch_size = engine_registry.fit_batch(options, batch_size, summary=summary,
                                               image_bytes=preprocess.crop_size[0] * preprocess.crop_size[1] * 3,
                                               prefetch=options.prefetch or 2, local=local)
    if start_checks:
        launch_checks.check_output(options.output, options.input)
    mode, why = resolve_decode(options, local)
    _LOG.info("decoding on %s (%s)", {"gpu": "the GPU (NVIDIA DALI)", "cpu": "the CPU (Pillow)",
                                     "dali_cpu": "the CPU (NVIDIA DALI)"}[mode], why)
    labels_file = options.labels_file or None
    explicit = tuple(read_labels(labels_file)) if labels_file else None  # a bad file fails before the engine
    # Every ONNX model goes through the adapter where it loads (weights files read beside it, the
    # conversion prepended where its input needs one); a plan runs as it was built.
    recipe = engine_registry.recipe(options, batch_size, model.preprocessing if model_file is not None else None,
                                    model.sha256 if model_file is not None else None)
    dali = _decoder(mode, options, preprocess, recipe.batch_size, local)
    per_call = GPU_DECODE_BATCHES_PER_CALL if dali else 1
    table = bigquery.resolve_target(options.output_table, options.run_date, options, options.engine,
                                    model.identity)
    rows = RowLayout.of(model, options.top_k, keep_columns)
    if table and start_checks:  # credentials, dataset, table and its schema, before anything runs
        schema = bigquery.table_schema(prediction_schema(rows))  # the rows write_and_commit loads
        _LOG.info("BigQuery table %s (%s): this run replaces its partition %s", table.spec,
                  bigquery.check_table(table, options, schema), table.partition)
    direct = options.view_as(DirectOptions)
    settings = RunSettings(
        input=options.input,
        # One spelling per folder from here on: the commit, --skip_scored's "the partition this run
        # replaces" and the records compare these (./scored//dt=1, a symlinked root and an absolute
        # path are one partition).
        output=storage.canonical(options.output),
        run_date=options.run_date,
        skip_scored=storage.canonical(options.skip_scored) if options.skip_scored else None,
        engine=options.engine, recipe=recipe,
        labels=explicit or _engine_labels(recipe, {model_file.path: loaded.summary} if loaded else {}),
        labels_file=labels_file,
        preprocess=preprocess,
        batch=BatchSettings(recipe.batch_size, per_call, options.prefetch or 2 * per_call,
                            score_ahead=not options.no_score_ahead and not options.share_model_across_processes),
        decode=DecodeSettings(mode, why, dali, options.max_decoders),
        read_threads=options.decode_threads, read_timeout_s=options.read_timeout_s or None,
        top_k=options.top_k, output_format=options.output_format, model=model, rows=rows,
        share_model_across_processes=bool(options.share_model_across_processes), model_copies=options.model_copies,
        local=local, local_defaults=defaults_note,
        runner=str(options.view_as(StandardOptions).runner or "DirectRunner"),
        direct_running_mode=direct.direct_running_mode, direct_num_workers=direct.direct_num_workers,
        progress_every_s=options.progress_every_s, bigquery=table,
        keep_columns=keep_columns)
    return settings, options
