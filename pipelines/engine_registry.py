"""The one place that knows which engines exist: ``--engine NAME`` -> the module that serves it.

Each engine module owns its flags and its recipe. What this registry asks of one (functions of
the parsed options, ``pipelines.settings.ClassifyOptions``, read by attribute and never changed):

- ``add_flags(parser)``: adds its flags, with their defaults and help (an argument group);
- ``FLAG_RANGES``: its numeric flags' bounds (``engines.flags.FlagRange``), and optionally
  ``check_flags(options)`` for other value checks; both run at start for every engine, whatever
  ``--engine`` is, so a typo in any flag stops the command (raises ``UsageError``);
- ``cli_on_gpu(options) -> bool``: whether the engine runs on a GPU (then images may be decoded
  on the GPU and fed device-resident);
- ``cli_model_file(options) -> engines.flags.ModelFile or None``: the ONNX model its flags name,
  which the launcher reads before anything runs (inputs, outputs, labels);
- ``cli_recipe(options, batch_size, preprocessing, sha256) -> engines.base.EngineRecipe``: the picklable
  loader (typed: a frozen dataclass such as ``OnnxRuntimeLoader``) that prepends ``preprocessing`` (an
  ``engines.model_adapter.Preprocessing``, or None) to the model it loads or builds, after checking
  its digest against ``sha256`` (the launcher's, which rows name; None: not checked), the batch size
  it wants (``batch_size``, or its own default when None), its description for stats.json, and
  where its class names come from;
- ``cli_worker_paths(options) -> list of engines.base.WorkerPath``: the files its flags name that
  the workers open, so that a launch to a remote runner can refuse one on the launching machine's
  disk (``pipelines/launch_checks.py``);
- ``cli_check(options, local) -> None``: refuses, at start, engine flags that cannot work (raises
  ``UsageError``); ``local`` says the engine will load on this machine, so its libraries can be asked.

And optionally:

- ``cli_fit_batch(options, batch_size, *, summary, image_bytes, prefetch, local)``: the batch size
  its model and this machine can take (default: ``batch_size`` as given);
- ``cli_local_defaults(options, cores) -> engines.flags.FlagDefaults or None``: what it runs
  fastest with on this machine, for flags the user left out (default: None);
- ``cli_built_model(options) -> engines.model_adapter.BuiltModel or None``: what an artefact built
  from a model (a TensorRT plan's sidecar) says of that model, when no ONNX model is named
  (default: None).

Every module's flags are added when options are parsed, so every module is imported then; none of
them imports its engine's library (TensorRT, CUDA, onnxruntime) before it loads a model, so naming
TensorRT here costs a laptop nothing. A third engine is one module with those functions plus one
line in :data:`ENGINES`.
"""

from __future__ import annotations

import importlib
from typing import Any, List, Optional

from engines.base import EngineRecipe, UsageError, WorkerPath
from engines.flags import PRECISIONS, FlagDefaults, ModelFile, check_ranges

#: Engine name -> module serving it (the functions listed in this module's docstring).
ENGINES = {
    "onnxruntime": "engines.onnxruntime_engine",
    "tensorrt": "engines.tensorrt.recipe",
}
#: ``--engine`` when it is not given.
DEFAULT_ENGINE = "onnxruntime"


def engine_names() -> List[str]:
    return list(ENGINES)


def _module(name: str):
    if name not in ENGINES:
        raise UsageError(f"--engine {name!r} is not one of {engine_names()}")
    return importlib.import_module(ENGINES[name])


def add_flags(parser) -> None:
    """Adds ``--engine`` and every engine's own flags to ``parser``."""
    parser.add_argument("--engine", default=DEFAULT_ENGINE, choices=engine_names(),
                        help=f"Inference engine (pipelines/engine_registry.py). Default: {DEFAULT_ENGINE}.")
    # Every engine's: each reads it with its own default (TensorRT fp16, ONNX Runtime fp32).
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="Compute precision: fp16 (weights and compute in float16; uint8 in and float32 out "
                             "stay) or fp32. Default: fp16 for tensorrt plans built with --onnx_path (a plan keeps "
                             "its own), fp32 for onnxruntime.")
    for name in ENGINES:
        adder = getattr(_module(name), "add_flags", None)
        if adder is not None:
            adder(parser)


def check_flags(options: Any) -> None:
    """Every engine's flag checks (``FLAG_RANGES`` and ``check_flags``), whatever ``--engine`` is.

    Raises:
        UsageError: naming the flag, the value and the accepted range.
    """
    for name in ENGINES:
        module = _module(name)
        check_ranges(options, getattr(module, "FLAG_RANGES", ()))
        checker = getattr(module, "check_flags", None)
        if checker is not None:
            checker(options)


def on_gpu(options: Any) -> bool:
    """Whether ``--engine`` runs on a GPU with these options."""
    return bool(_module(options.engine).cli_on_gpu(options))


def model_file(options: Any) -> Optional[ModelFile]:
    """The ONNX model ``--engine``'s flags name, which the launcher reads before anything runs, or None."""
    return _module(options.engine).cli_model_file(options)


def fit_batch(options: Any, batch_size: Optional[int], *, summary, image_bytes: int, prefetch: int,
              local: bool) -> Optional[int]:
    """The batch size ``--engine`` can take with its model here (None: the engine's default).

    Args:
        options: The parsed options.
        batch_size: ``--batch_size``, or None.
        summary: The model's ``engines.onnx_summary.OnnxSummary`` (:func:`model_file`'s).
        image_bytes: Bytes of one preprocessed image.
        prefetch: Batches each reader holds ahead of the engine.
        local: The engine loads on this machine.

    Raises:
        UsageError: a batch size the model or this machine's memory cannot take, naming ``--batch_size``.
        EngineError: a model whose batch dimension cannot work at all.
    """
    fit = getattr(_module(options.engine), "cli_fit_batch", None)
    if fit is None:
        return batch_size
    return fit(options, batch_size, summary=summary, image_bytes=image_bytes, prefetch=prefetch, local=local)


def local_defaults(options: Any, cores: int) -> Optional[FlagDefaults]:
    """What ``--engine`` runs fastest with on this machine, for flags left out; None: nothing to choose."""
    chosen = getattr(_module(options.engine), "cli_local_defaults", None)
    return chosen(options, cores) if chosen is not None else None


def built_model(options: Any):
    """What ``--engine``'s built artefact says of its model (``engines.model_adapter.BuiltModel``), or None."""
    describe = getattr(_module(options.engine), "cli_built_model", None)
    return describe(options) if describe is not None else None


def recipe(options: Any, batch_size: Optional[int], preprocessing=None, sha256: Optional[str] = None) -> EngineRecipe:
    """The engine recipe for ``--engine`` (nothing is loaded).

    Args:
        options: The parsed options.
        batch_size: Images per batch (:func:`fit_batch`'s answer), or None for the engine's default.
        preprocessing: The conversion the loader prepends to the model (``engines.model_adapter.Preprocessing``),
            or None: the model is loaded as it is.
        sha256: The model's digest at launch, which the loader checks where it loads the model, or None.

    Raises:
        UsageError: an unknown engine, or flags the engine cannot use (naming the flag).
        EngineError: an engine artefact that cannot be used (e.g. profiles no batch fits).
    """
    return _module(options.engine).cli_recipe(options, batch_size, preprocessing, sha256)


def worker_paths(options: Any) -> List[WorkerPath]:
    """The files ``--engine``'s flags name that the workers open (read, or write for caches)."""
    return list(_module(options.engine).cli_worker_paths(options))


def check(options: Any, local: bool) -> None:
    """``--engine``'s own start-up checks (``local``: the engine loads on this machine).

    Raises:
        UsageError: naming the flag and the fix.
    """
    _module(options.engine).cli_check(options, local)
