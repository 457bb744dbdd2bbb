"""``--engine tensorrt`` for the job: its flags, and the loader, batch size, description and labels from them.

What ``pipelines/engine_registry.py`` asks of an engine module (``add_flags``, ``FLAG_RANGES``,
``cli_recipe``, ...). Nothing TensorRT or CUDA is imported: the batch size comes from the plan's sidecar
(``--engine_path``) or the build options (``--onnx_path``), so a laptop builds and submits the
job. The engine itself splits batches above the largest profile and pads chunks below the
smallest profile min (``engines.tensorrt.runtime``), so the pipeline only picks one size.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engines.base import EngineError, EngineRecipe, UsageError, WorkerPath
from engines.flags import BATCH_WHY, MAX_BATCH, MAX_COPIES, FlagRange, ModelFile, show
from engines.tensorrt.loader import TensorRTLoader
from engines.model_adapter import OUTPUT_ACTIVATION_KEY
from engines.tensorrt.options import BuildOptions, Profile
from engines.tensorrt.plan import read_sidecar

_LOG = logging.getLogger(__name__)

#: ``--precision`` when not given (the flag is every engine's: ``pipelines/engine_registry.py``): plans
#: built on the workers are fp16, where TensorRT's speed is.
DEFAULT_PRECISION = "fp16"
#: Largest --workspace_gib: more than any GPU's memory (an H200 has 141 GB).
MAX_WORKSPACE_GIB = 1024

#: Bounds of this engine's numeric flags, checked at start whatever --engine is (``engines/flags.py``);
#: --workspace_gib and --trt_profile have their own checks (:func:`check_flags`).
FLAG_RANGES = (
    FlagRange("--min_batch_size", "min_batch_size", 1, MAX_BATCH, BATCH_WHY),
    FlagRange("--num_contexts", "num_contexts", 1, MAX_COPIES, "each context holds its own activation memory"),
)


def add_flags(argparser) -> None:
    """Adds ``--engine tensorrt``'s flags to an ``argparse`` parser (see ``pipelines/engine_registry.py``).

    Not named ``parser``: in this package that name is TensorRT's ONNX parser
    (``tests/test_tensorrt_api.py`` checks every TensorRT name the package uses).
    """
    group = argparser.add_argument_group("--engine tensorrt")
    group.add_argument("--engine_path", default=None, help="TensorRT: a serialized engine (.plan).")
    group.add_argument("--onnx_path", default=None,
                       help="TensorRT: an ONNX model to build (or fetch from --engine_cache) on the worker.")
    group.add_argument("--engine_cache", default=None,
                       help="TensorRT: directory (local or gs://) of plans keyed by GPU, TensorRT "
                            "version and build options.")
    group.add_argument("--trt_profile", dest="trt_profiles", action="append", default=None,
                       metavar="MIN,OPT,MAX",
                       help="TensorRT optimisation profile for the batch dimension with --onnx_path "
                            "(repeatable). Default: 1,B,B with B = --batch_size or 64.")
    group.add_argument("--num_contexts", type=int, default=2,
                       help="TensorRT execution contexts per engine: copies in, compute and copies out "
                            "of consecutive batches overlap. Default: 2.")
    group.add_argument("--cuda_graphs", action="store_true",
                       help="TensorRT: capture and replay a CUDA graph per batch shape.")
    group.add_argument("--workspace_gib", type=float, default=None,
                       help="TensorRT builder workspace limit in GiB. Default: TensorRT's.")
    group.add_argument("--timing_cache", default=None,
                       help="TensorRT builder timing cache to reuse and update (local or gs://): one file per "
                            "GPU type and TensorRT version, PATH.<gpu>-sm<cc>-trt<version>, so caches of "
                            "different GPUs never merge.")
    group.add_argument("--min_batch_size", type=int, default=None,
                       help="TensorRT: the batch size the profile is tuned for (default: the profile opt); "
                            "batches are always --batch_size images, only a bundle's last is shorter.")


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


def check_flags(options: Any) -> None:
    """The checks of this engine's flags that are not ranges (:data:`FLAG_RANGES`), run at start
    whatever --engine is.

    Raises:
        UsageError: naming the flag, the value and the accepted values.
    """
    workspace = options.workspace_gib
    if workspace is not None and not 0 < workspace <= MAX_WORKSPACE_GIB:
        # Not a FlagRange: 0 is refused too (TensorRT needs some workspace; leave the flag out for its default).
        raise UsageError(f"--workspace_gib must be > 0 and <= {MAX_WORKSPACE_GIB}, got {show(workspace)} (accepted: "
                         f"above 0 to {MAX_WORKSPACE_GIB} GiB, more than any GPU's memory; leave it out for "
                         f"TensorRT's default)")
    _check_profiles(options.trt_profiles)
    if options.batch_size and options.min_batch_size and options.min_batch_size > options.batch_size:
        raise UsageError(f"--min_batch_size {options.min_batch_size} is larger than --batch_size "
                         f"{options.batch_size}; lower it or raise --batch_size")


def choose_batch_sizes(profiles: Sequence[Profile], min_batch_size: Optional[int] = None,
                       max_batch_size: Optional[int] = None, source: str = "the engine") -> Tuple[int, int, str]:
    """Batch sizes aligned to the engine's profiles.

    Defaults: the largest profile's max as ``max_batch_size`` (every batch runs as one
    engine call) and its opt as ``min_batch_size``.

    Returns:
        ``(min_batch_size, max_batch_size, one line saying how they were chosen)``.

    Raises:
        EngineError: no profiles, or min > max.
    """
    if not profiles:
        raise EngineError(f"{source} has no optimisation profiles to align batch sizes to")
    largest = max(profiles, key=lambda p: (p.max, p.opt))
    auto_max = max_batch_size is None
    auto_min = min_batch_size is None
    hi = largest.max if auto_max else int(max_batch_size)
    lo = min(largest.opt, hi) if auto_min else int(min_batch_size)
    if lo < 1 or hi < lo:
        raise EngineError(f"need 1 <= min_batch_size <= max_batch_size, got {lo}, {hi}")
    parts = [f"batch sizes min={lo} max={hi}"]
    if auto_max or auto_min:
        parts.append(f"chosen from {source} profile {largest.describe()}")
    if hi > largest.max:
        parts.append(f"batches above {largest.max} are split across the engine's largest profile")
    smallest_min = min(p.min for p in profiles)
    if smallest_min > 1:
        parts.append(f"batches below the smallest profile min {smallest_min} are padded by repeating the last "
                     f"example")
    return lo, hi, "tensorrt: " + "; ".join(parts)


def cli_on_gpu(options: Any) -> bool:
    """TensorRT always runs on a GPU (see ``pipelines/engine_registry.py``)."""
    return True


def cli_built_model(options: Any):
    """What ``--engine_path``'s sidecar says of the model the plan was built from
    (``engines.model_adapter.BuiltModel``; see ``pipelines/engine_registry.py``), or None with
    ``--onnx_path``, whose model the launcher reads itself."""
    from engines.model_adapter import BuiltModel, recorded_preprocessing_of

    if not options.engine_path:
        return None
    info = read_sidecar(options.engine_path, required=False)
    if info is None:
        return BuiltModel(options.engine_path)
    extra = info.extra

    def tensors(key):
        return tuple((t["name"], t["onnx_type"], tuple(t["dims"])) for t in extra.get(key) or ())

    metadata = extra.get("onnx_metadata") or {}
    recorded = json.loads(metadata[OUTPUT_ACTIVATION_KEY]) if OUTPUT_ACTIVATION_KEY in metadata else {}
    return BuiltModel(options.engine_path, tensors("inputs"), tensors("outputs"),
                      recorded_preprocessing_of(metadata), {**recorded, **(extra.get("activations") or {})},
                      dict(extra.get("final_activations") or {}), extra.get("plan_sha256"))


def cli_model_file(options: Any) -> Optional[ModelFile]:
    """``--onnx_path``, which the launcher reads before anything runs; None for a built plan, whose
    shapes are checked where a worker loads it (see ``pipelines/engine_registry.py``)."""
    return ModelFile(options.onnx_path, "--onnx_path") if options.onnx_path else None


def _loader(options: Any, batch_size: Optional[int], preprocessing=None, sha256=None) -> TensorRTLoader:
    build_options = BuildOptions()
    if options.onnx_path:
        profiles = tuple(Profile.parse(p) for p in (options.trt_profiles or ()))
        if not profiles:
            size = int(batch_size or 64)
            profiles = (Profile(1, size, size),)
        build_options = BuildOptions(profiles=profiles, precision=options.precision or DEFAULT_PRECISION,
                                     workspace_gib=options.workspace_gib, timing_cache=options.timing_cache)
    return TensorRTLoader(engine_path=options.engine_path, onnx_path=options.onnx_path,
                          engine_cache=options.engine_cache, build_options=build_options,
                          num_contexts=int(options.num_contexts or 2), cuda_graphs=bool(options.cuda_graphs),
                          device="auto",  # each copy or process on the next GPU
                          preprocessing=preprocessing if options.onnx_path else None,
                          sha256=sha256 if options.onnx_path else None)


def _warn_ignored_build_flags(options: Any, info) -> None:
    """A built plan fixes its profiles, precision and build settings: say so rather than let a build
    flag look as if it had taken effect."""
    ignored = [flag for flag, name in (("--trt_profile", "trt_profiles"), ("--workspace_gib", "workspace_gib"),
                                       ("--timing_cache", "timing_cache"), ("--engine_cache", "engine_cache"))
               if getattr(options, name)]
    if info and options.precision and options.precision != info.precision:
        ignored.append(f"--precision {options.precision} (the plan is {info.precision})")
    if ignored:
        _LOG.warning("ignored with --engine_path, which loads a plan as it was built: %s. To change them, rebuild "
                     "with `python -m model_tools.build`, or pass --onnx_path to build on the workers", ", ".join(ignored))


def cli_check(options: Any, local: bool) -> None:
    """Nothing to check at start beyond the flags ``cli_recipe`` reads: whether TensorRT, the driver and a
    GPU of the plan's kind are there is known only where the engine loads, and the loader says so in one
    error (``engines/tensorrt/deserialize.py``). See ``pipelines/engine_registry.py``."""


def cli_worker_paths(options: Any) -> List[WorkerPath]:
    """The plan (and its sidecar) or the ONNX model the workers read, and the caches they write when they
    build (``--engine_cache``, ``--timing_cache``, used with ``--onnx_path`` only); see
    ``pipelines/engine_registry.py``."""
    paths = []
    if options.engine_path:
        paths.append(WorkerPath("--engine_path", options.engine_path,
                                note=f"with its sidecar {options.engine_path}.json beside it"))
    if options.onnx_path:
        paths.append(WorkerPath("--onnx_path", options.onnx_path))
        paths += [WorkerPath(flag, value, written=True)
                  for flag, value in (("--engine_cache", options.engine_cache), ("--timing_cache", options.timing_cache))
                  if value]
    return paths


def cli_recipe(options: Any, batch_size: Optional[int], preprocessing=None, sha256=None) -> EngineRecipe:
    """The TensorRT recipe from ``--engine_path`` or ``--onnx_path`` and the build flags
    (``pipelines.settings.ClassifyOptions``, read by attribute); the batch size comes from the
    plan's profiles unless one is given (see ``pipelines/engine_registry.py``).

    Args:
        options: The parsed options (read by attribute, never changed).
        batch_size: ``--batch_size``, or None for the largest profile's max.
        preprocessing: With ``--onnx_path``: the conversion to prepend to the model before it is
            built (``engines.model_adapter.Preprocessing``), or None to build it as it is.
        sha256: With ``--onnx_path``: the model's digest at launch, checked where it loads, or None.

    Raises:
        UsageError: neither ``--engine_path`` nor ``--onnx_path``, or a plan without its sidecar
            and without ``--batch_size`` (its profiles are then unknown before a worker loads it).
        EngineError: batch sizes no profile can take (:func:`choose_batch_sizes`).
    """
    if not (options.engine_path or options.onnx_path):
        raise UsageError("--engine tensorrt needs --engine_path PLAN (built by `python -m model_tools.build`) or "
                         "--onnx_path MODEL.onnx (built on the workers, cached in --engine_cache)")
    loader = _loader(options, batch_size, preprocessing, sha256)
    info = loader.plan_info()
    if options.engine_path and info is None:
        if batch_size is None:
            raise UsageError(f"No sidecar {options.engine_path}.json beside the plan, so its profiles are unknown "
                             f"here; copy the .json written by `python -m model_tools.build` next to it, or pass "
                             f"--batch_size")
        profiles: Tuple[Profile, ...] = (Profile(1, int(batch_size), int(batch_size)),)
        source = "the given --batch_size (no sidecar)"
    else:
        profiles = info.profiles if info else loader.build_options.profiles
        source = f"{options.engine_path}.json" if info else "the build options"
    lo, hi, line = choose_batch_sizes(profiles, options.min_batch_size, batch_size, source)
    _LOG.info("%s", line)
    if options.engine_path:
        _warn_ignored_build_flags(options, info)
    described: Dict[str, Any] = {
        "engine": "tensorrt", "model": options.engine_path or options.onnx_path,
        "engine_path": loader.engine_path, "onnx_path": loader.onnx_path, "engine_cache": loader.engine_cache,
        "profiles": [p.to_json() for p in profiles],
        "num_contexts": loader.num_contexts, "cuda_graphs": loader.cuda_graphs, "device": loader.device,
        "min_batch_size": lo, "max_batch_size": hi, "batch_choice": line,
    }
    if info:
        described.update(precision=info.precision, built_with=info.tensorrt_version,
                         built_on=f"{info.gpu_name} (compute {info.compute_capability})")
    elif loader.onnx_path:
        described.update(precision=loader.build_options.precision)
    return EngineRecipe(loader, hi, described, labels=list(info.labels) if info and info.labels else None,
                        labels_model=options.onnx_path, labels_flag="--onnx_path")
