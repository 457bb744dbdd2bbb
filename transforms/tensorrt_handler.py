"""``TensorRTModelHandler``: serves a TensorRT engine to Beam's ``RunInference``.

A small picklable recipe (paths, a frozen :class:`~engines.tensorrt.options.BuildOptions`,
batch settings). Nothing TensorRT or CUDA exists until ``load_model()`` runs on the
worker; constructing the handler and submitting the pipeline works on a laptop
without either. Batch sizes are aligned to the engine's optimisation profiles, read
from the plan's sidecar (``--engine_path``) or the build options (``--onnx_path``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from apache_beam.ml.inference.base import PredictionResult

from engines.base import Engine, EngineError, EngineRecipe
from engines.tensorrt.loader import TensorRTLoader
from engines.tensorrt.options import BuildOptions, Profile
from transforms.inference import EngineModelHandler, Example

_LOG = logging.getLogger(__name__)


def choose_batch_sizes(profiles: Sequence[Profile], min_batch_size: Optional[int] = None,
                       max_batch_size: Optional[int] = None, source: str = "the engine") -> Tuple[int, int, str]:
    """Batch sizes for RunInference, aligned to the engine's profiles.

    Defaults: the largest profile's max as ``max_batch_size`` (every batch runs as one
    engine call) and its opt as ``min_batch_size`` (where Beam's adaptive batching starts).

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


class TensorRTModelHandler(EngineModelHandler):
    """RunInference over a TensorRT engine, one per worker process (or per GPU across processes).

    Give ``engine_path`` (a plan built by ``python -m engines.build`` for the workers' GPU
    type) or ``onnx_path`` (built on the workers; with ``engine_cache`` once per GPU type).

    Args:
        engine_path: A plan, local or gs://, with its ``.json`` sidecar beside it.
        onnx_path: An ONNX model, local or gs://.
        engine_cache: With ``onnx_path``: a local directory or gs:// prefix for built plans.
            Default None (each worker builds in memory).
        build_options: With ``onnx_path``: profiles, precision, ... Default ``BuildOptions()``.
        min_batch_size: Default None: the largest profile's opt (capped at ``max_batch_size``).
        max_batch_size: Default None: the largest profile's max.
        max_batch_duration_secs: How long a batch may wait to fill (streaming). Default None.
        share_across_processes: One engine per worker machine (or ``model_copies``), shared by
            its processes, instead of one per process. Default False.
        model_copies: With ``share_across_processes``: engine copies per machine; with
            ``device=None`` they are spread over the machine's GPUs. Default 1.
        num_contexts: Execution contexts per engine (overlap of copies and compute); they share
            the plan's profiles, so any number runs any plan. Default 2.
        cuda_graphs: Replay CUDA graphs per batch shape. Default False.
        device: GPU index, "auto" (round-robin over the machine's GPUs), or None: "auto" when
            ``model_copies > 1``, else 0. Default None.
        model_id: Label in each PredictionResult. Default: the engine or ONNX path.

    Raises:
        EngineError: bad paths or options, or ``engine_path`` without a sidecar and without
            ``max_batch_size`` (the profile is then unknown before a worker loads it).
    """

    def __init__(self, *, engine_path: Optional[str] = None, onnx_path: Optional[str] = None,
                 engine_cache: Optional[str] = None, build_options: Optional[BuildOptions] = None,
                 min_batch_size: Optional[int] = None, max_batch_size: Optional[int] = None,
                 max_batch_duration_secs: Optional[float] = None, share_across_processes: bool = False,
                 model_copies: int = 1, num_contexts: int = 2, cuda_graphs: bool = False,
                 device: Union[int, str, None] = None, model_id: str = ""):
        if device is None:
            device = "auto" if model_copies > 1 else 0
        if build_options is None:
            build_options = BuildOptions()
        loader = TensorRTLoader(engine_path=engine_path, onnx_path=onnx_path, engine_cache=engine_cache,
                                build_options=build_options, num_contexts=num_contexts,
                                cuda_graphs=cuda_graphs, device=device)
        info = loader.plan_info()
        if engine_path and info is None:
            if max_batch_size is None:
                raise EngineError(f"No sidecar {engine_path}.json beside the plan, so its profiles are unknown here; "
                                  f"copy the .json written by `python -m engines.build` next to it, or pass "
                                  f"max_batch_size (and min_batch_size) yourself")
            profiles: Tuple[Profile, ...] = (Profile(1, int(max_batch_size), int(max_batch_size)),)
            source = "the given max_batch_size (no sidecar)"
        else:
            profiles = info.profiles if info else loader.build_options.profiles
            source = f"{engine_path}.json" if info else "the build options"
        lo, hi, line = choose_batch_sizes(profiles, min_batch_size, max_batch_size, source)
        _LOG.info("%s", line)
        super().__init__(loader, min_batch_size=lo, max_batch_size=hi, max_batch_duration_secs=max_batch_duration_secs,
                         share_across_processes=share_across_processes, model_copies=model_copies,
                         metrics_namespace="tensorrt", model_id=model_id or engine_path or onnx_path)
        self._info = info
        self._profiles = profiles
        self._pad_to = min(p.min for p in profiles)
        self._batch_choice = line

    @classmethod
    def from_options(cls, options: Any, *, min_batch_size: Optional[int] = None) -> "TensorRTModelHandler":
        """A handler from command-line options (``pipelines.classify_images.ClassifyOptions``).

        Reads ``engine_path``, ``onnx_path``, ``engine_cache``, ``precision``, ``batch_size``,
        ``share_model_across_processes``, ``model_copies`` and, when present,
        ``trt_profiles`` (list of "MIN,OPT,MAX"), ``num_contexts``, ``cuda_graphs``,
        ``workspace_gib``, ``timing_cache``. With ``onnx_path`` and no ``trt_profiles`` the
        profile is ``(1, batch_size, batch_size)``. ``batch_size`` None means: from the profile.
        """
        get = lambda name, default=None: getattr(options, name, default)  # noqa: E731
        batch = get("batch_size")
        num_contexts = int(get("num_contexts", 2) or 2)
        build_options = None
        if get("onnx_path"):
            profiles = tuple(Profile.parse(p) for p in (get("trt_profiles") or ()))
            if not profiles:
                size = int(batch or 64)
                profiles = (Profile(1, size, size),)
            build_options = BuildOptions(profiles=profiles, precision=get("precision") or "fp32",
                                         workspace_gib=get("workspace_gib"), timing_cache=get("timing_cache"))
        handler = cls(engine_path=get("engine_path"), onnx_path=get("onnx_path"), engine_cache=get("engine_cache"),
                      build_options=build_options, min_batch_size=min_batch_size, max_batch_size=batch,
                      share_across_processes=bool(get("share_model_across_processes", False)),
                      model_copies=int(get("model_copies", 1) or 1), num_contexts=num_contexts,
                      cuda_graphs=bool(get("cuda_graphs", False)))
        if get("engine_path"):
            # A built plan fixes its profiles, precision and build settings: say so rather than
            # let a build flag look as if it had taken effect.
            ignored = [flag for flag, name in (("--trt_profile", "trt_profiles"), ("--workspace_gib", "workspace_gib"),
                                               ("--timing_cache", "timing_cache"), ("--engine_cache", "engine_cache"))
                       if get(name)]
            info = handler._info
            if info and get("precision") and get("precision") != info.precision:
                ignored.append(f"--precision {get('precision')} (the plan is {info.precision})")
            if ignored:
                _LOG.warning("ignored with --engine_path, which loads a plan as it was built: %s. To change them, "
                             "rebuild with `python -m engines.build`, or pass --onnx_path to build on the workers",
                             ", ".join(ignored))
        return handler

    @property
    def profiles(self) -> Tuple[Profile, ...]:
        return self._profiles

    def labels(self) -> Optional[List[str]]:
        """Class names from the plan's sidecar (the ONNX model's ``labels`` metadata), or None."""
        return list(self._info.labels) if self._info and self._info.labels else None

    def run_inference(self, batch: Sequence[Example], model: Engine,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
        # Beam forms smaller batches at bundle ends; the engine refuses batches below every
        # profile's min, so pad with copies of the last example and drop their results.
        if batch and len(batch) < self._pad_to:
            padded = list(batch) + [batch[-1]] * (self._pad_to - len(batch))
            return list(super().run_inference(padded, model, inference_args))[:len(batch)]
        return super().run_inference(batch, model, inference_args)

    def describe_engine(self) -> Dict[str, Any]:
        """A JSON-able summary for stats (no TensorRT needed)."""
        loader = self.loader
        info: Dict[str, Any] = {
            "engine": "tensorrt",
            "engine_path": loader.engine_path, "onnx_path": loader.onnx_path, "engine_cache": loader.engine_cache,
            "profiles": [p.to_json() for p in self._profiles],
            "num_contexts": loader.num_contexts, "cuda_graphs": loader.cuda_graphs, "device": loader.device,
            "min_batch_size": self._min_batch_size, "max_batch_size": self._max_batch_size,
            "batch_choice": self._batch_choice,
        }
        if self._info:
            info.update(precision=self._info.precision, built_with=self._info.tensorrt_version,
                        built_on=f"{self._info.gpu_name} (compute {self._info.compute_capability})")
        elif loader.onnx_path:
            info.update(precision=loader.build_options.precision)
        return info


def cli_on_gpu(options: Any) -> bool:
    """TensorRT always runs on a GPU (see ``pipelines/engine_registry.py``)."""
    return True


def cli_recipe(options: Any) -> EngineRecipe:
    """The TensorRT recipe from ``--engine_path`` or ``--onnx_path`` and the build flags; the batch
    size comes from the plan's profiles unless ``--batch_size`` is given (see
    ``pipelines/engine_registry.py``).

    Raises:
        EngineError: neither ``--engine_path`` nor ``--onnx_path``.
    """
    if not (options.engine_path or options.onnx_path):
        raise EngineError("--engine tensorrt needs --engine_path PLAN (built by `python -m engines.build`) or "
                          "--onnx_path MODEL.onnx (built on the workers, cached in --engine_cache)")
    handler = TensorRTModelHandler.from_options(options, min_batch_size=options.min_batch_size)
    return EngineRecipe(handler.loader, handler.batch_elements_kwargs()["max_batch_size"], True,
                        {**handler.describe_engine(), "model": options.engine_path or options.onnx_path},
                        labels=handler.labels(), labels_model=options.onnx_path, labels_flag="--onnx_path")
