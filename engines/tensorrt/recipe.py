"""``--engine tensorrt`` for the job: the loader, batch size, description and labels from the flags.

What ``pipelines/engine_registry.py`` asks of an engine module (``cli_on_gpu``, ``cli_recipe``).
Nothing TensorRT or CUDA is imported: the batch size comes from the plan's sidecar
(``--engine_path``) or the build options (``--onnx_path``), so a laptop builds and submits the
job. The engine itself splits batches above the largest profile and pads chunks below the
smallest profile min (``engines.tensorrt.runtime``), so the pipeline only picks one size.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engines.base import EngineError, EngineRecipe, UsageError, WorkerPath
from engines.tensorrt.loader import TensorRTLoader
from engines.tensorrt.options import BuildOptions, Profile

_LOG = logging.getLogger(__name__)


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


def _loader(options: Any) -> TensorRTLoader:
    build_options = BuildOptions()
    if options.onnx_path:
        profiles = tuple(Profile.parse(p) for p in (options.trt_profiles or ()))
        if not profiles:
            size = int(options.batch_size or 64)
            profiles = (Profile(1, size, size),)
        build_options = BuildOptions(profiles=profiles, precision=options.precision or "fp32",
                                     workspace_gib=options.workspace_gib, timing_cache=options.timing_cache)
    return TensorRTLoader(engine_path=options.engine_path, onnx_path=options.onnx_path,
                          engine_cache=options.engine_cache, build_options=build_options,
                          num_contexts=int(options.num_contexts or 2), cuda_graphs=bool(options.cuda_graphs),
                          device="auto")  # each copy or process on the next GPU


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


def cli_recipe(options: Any) -> EngineRecipe:
    """The TensorRT recipe from ``--engine_path`` or ``--onnx_path`` and the build flags
    (``pipelines.classify_images.ClassifyOptions``, read by attribute); the batch size comes from
    the plan's profiles unless ``--batch_size`` is given (see ``pipelines/engine_registry.py``).

    Raises:
        EngineError: neither ``--engine_path`` nor ``--onnx_path``, or a plan without its sidecar
            and without ``--batch_size`` (its profiles are then unknown before a worker loads it).
    """
    if not (options.engine_path or options.onnx_path):
        raise UsageError("--engine tensorrt needs --engine_path PLAN (built by `python -m model_tools.build`) or "
                         "--onnx_path MODEL.onnx (built on the workers, cached in --engine_cache)")
    loader = _loader(options)
    info = loader.plan_info()
    if options.engine_path and info is None:
        if options.batch_size is None:
            raise UsageError(f"No sidecar {options.engine_path}.json beside the plan, so its profiles are unknown "
                             f"here; copy the .json written by `python -m model_tools.build` next to it, or pass "
                             f"--batch_size")
        profiles: Tuple[Profile, ...] = (Profile(1, int(options.batch_size), int(options.batch_size)),)
        source = "the given --batch_size (no sidecar)"
    else:
        profiles = info.profiles if info else loader.build_options.profiles
        source = f"{options.engine_path}.json" if info else "the build options"
    lo, hi, line = choose_batch_sizes(profiles, options.min_batch_size, options.batch_size, source)
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
