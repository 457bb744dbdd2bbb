"""The one place that knows which engines exist: ``--engine NAME`` -> the module that serves it.

Each engine module exposes two functions of the job's options (``pipelines.classify_images.
ClassifyOptions``, read by attribute):

- ``cli_on_gpu(options) -> bool``: whether the engine runs on a GPU (then images may be decoded
  on the GPU and fed device-resident);
- ``cli_recipe(options) -> engines.base.EngineRecipe``: the picklable loader (typed: a frozen
  dataclass such as ``OnnxRuntimeLoader``), the batch size it wants, its description for
  stats.json, and where its class names come from;
- ``cli_worker_paths(options) -> list of engines.base.WorkerPath``: the files its flags name that
  the workers open, so that a launch to a remote runner can refuse one on the launching machine's
  disk (``pipelines/launch_checks.py``);
- ``cli_check(options, local) -> None``: refuses, at start, engine flags that cannot work (raises
  ``UsageError``); ``local`` says the engine will load on this machine, so its libraries can be asked.

Modules are imported only when their engine is chosen, so naming TensorRT here costs a laptop
nothing. A third engine is one file with those functions plus one line in :data:`ENGINES`.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from engines.base import EngineRecipe, UsageError, WorkerPath

#: Engine name -> module exposing ``cli_on_gpu``, ``cli_recipe``, ``cli_worker_paths`` and ``cli_check``.
ENGINES = {
    "onnxruntime": "engines.onnxruntime_engine",
    "tensorrt": "engines.tensorrt.recipe",
}


def engine_names() -> List[str]:
    return list(ENGINES)


def _module(name: str):
    if name not in ENGINES:
        raise UsageError(f"--engine {name!r} is not one of {engine_names()}")
    return importlib.import_module(ENGINES[name])


def on_gpu(options: Any) -> bool:
    """Whether ``--engine`` runs on a GPU with these options."""
    return bool(_module(options.engine).cli_on_gpu(options))


def recipe(options: Any) -> EngineRecipe:
    """The engine recipe for ``--engine`` (nothing is loaded).

    Raises:
        EngineError: an unknown engine, or options the engine cannot use (naming the flag).
    """
    return _module(options.engine).cli_recipe(options)


def worker_paths(options: Any) -> List[WorkerPath]:
    """The files ``--engine``'s flags name that the workers open (read, or write for caches)."""
    return list(_module(options.engine).cli_worker_paths(options))


def check(options: Any, local: bool) -> None:
    """``--engine``'s own start-up checks (``local``: the engine loads on this machine).

    Raises:
        UsageError: naming the flag and the fix.
    """
    _module(options.engine).cli_check(options, local)
