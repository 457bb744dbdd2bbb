"""A Beam ``ModelHandler`` that serves any :class:`engines.base.Engine` to ``RunInference``.

The handler is a small picklable recipe: an engine loader (a picklable callable
such as :class:`engines.onnxruntime_engine.OnnxRuntimeLoader`) and batch settings.
No engine object exists until ``load_model()`` runs on the worker; RunInference
then shares the loaded engine across the worker's threads (and, with
``share_across_processes``, across its processes).

Examples are uint8 arrays for a single-input model, or ``{input name: array}``
dicts for any number of inputs. Each prediction is a ``PredictionResult`` whose
``inference`` is ``{output name: array}`` for that example; ``example`` is left
None so the image pixels are not carried downstream.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from engines.base import Engine, EngineError, EngineLoader
from transforms.timing import NAMESPACE, LatencyHistogram, stage_distribution

_LOG = logging.getLogger(__name__)

Example = Union[np.ndarray, Mapping[str, np.ndarray]]


def split_batch(batch_size: int, max_size: Optional[int]) -> Sequence[slice]:
    """Slices that cut a batch into the fewest chunks of at most ``max_size``, as even as possible.

    Even chunks (150 at max 64 -> 50, 50, 50) rather than a short remainder (64, 64, 22), which
    could fall under an engine's smallest allowed batch (a TensorRT profile min). None: one chunk.
    """
    if not max_size or batch_size <= max_size:
        return [slice(0, batch_size)]
    chunks = -(-batch_size // max_size)
    base, extra = divmod(batch_size, chunks)
    bounds = [0]
    for i in range(chunks):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class EngineModelHandler(ModelHandler[Example, PredictionResult, Engine]):
    """Runs batches of examples through an engine.

    Args:
        loader: A picklable callable returning an :class:`Engine` (runs on the worker).
        min_batch_size: Smallest batch RunInference forms (the last may be shorter). Default 1.
        max_batch_size: Largest batch RunInference forms. Default 64. Batches larger than
            the engine's ``batch_limit()`` are split evenly before ``infer``.
        max_batch_duration_secs: How long a batch may wait to fill (streaming). Default None.
        share_across_processes: Share one engine across a worker's processes (Beam's
            multi-process shared model) instead of one per process. Default False.
        model_copies: With ``share_across_processes``, how many engine copies a worker
            holds (e.g. one per GPU). Default 1.
        metrics_namespace: Namespace of RunInference's own metrics. Default "engine".
        model_id: Label stored in each ``PredictionResult.model_id``. Default "" (the loader's repr).
    """

    def __init__(self, loader: EngineLoader, *, min_batch_size: int = 1, max_batch_size: int = 64,
                 max_batch_duration_secs: Optional[float] = None, share_across_processes: bool = False,
                 model_copies: int = 1, metrics_namespace: str = "engine", model_id: str = ""):
        super().__init__()
        if not callable(loader):
            raise EngineError(f"loader must be a callable returning an Engine, got {type(loader).__name__}")
        if min_batch_size < 1 or max_batch_size < min_batch_size:
            raise EngineError(f"need 1 <= min_batch_size <= max_batch_size, got {min_batch_size}, {max_batch_size}")
        if model_copies < 1:
            raise EngineError(f"model_copies must be >= 1, got {model_copies}")
        if model_copies > 1 and not share_across_processes:
            raise EngineError("model_copies > 1 needs share_across_processes=True (one copy per GPU)")
        self._loader = loader
        self._min_batch_size = min_batch_size
        self._max_batch_size = max_batch_size
        self._max_batch_duration_secs = max_batch_duration_secs
        self._share_across_processes = share_across_processes
        self._model_copies = model_copies
        self._metrics_namespace = metrics_namespace
        self._model_id = model_id or repr(loader)
        self._histogram = None

    @property
    def loader(self) -> EngineLoader:
        return self._loader

    def load_model(self) -> Engine:
        start = time.perf_counter()
        engine = self._loader()
        _LOG.info("loaded %s in %.2f s: %s", engine.kind, time.perf_counter() - start, engine.describe())
        limit = engine.batch_limit()
        if limit and limit < self._max_batch_size:
            _LOG.info("batches of up to %d are split into chunks of the engine's max batch %d",
                      self._max_batch_size, limit)
        return engine

    @staticmethod
    def _stack(batch: Sequence[Example], engine: Engine) -> Dict[str, np.ndarray]:
        # Only methods of the engine are used here: with share_across_processes it is a proxy.
        names = engine.input_names()
        if batch and not isinstance(batch[0], Mapping):
            if len(names) != 1:
                raise EngineError(f"The model has {len(names)} inputs {names}; pass each example as a "
                                  f"dict of input name -> array")
            return {names[0]: np.stack(batch)}
        return {name: np.stack([example[name] for example in batch]) for name in names}

    def run_inference(self, batch: Sequence[Example], model: Engine,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
        if not batch:
            return []
        if self._histogram is None:
            self._histogram = LatencyHistogram()
        start = time.perf_counter()
        feed = self._stack(batch, model)
        outputs: Dict[str, list] = {}
        for chunk in split_batch(len(batch), model.batch_limit()):
            result = model.infer({name: array[chunk] for name, array in feed.items()})
            for name, array in result.items():
                outputs.setdefault(name, []).append(array)
        merged = {name: parts[0] if len(parts) == 1 else np.concatenate(parts) for name, parts in outputs.items()}
        for name, array in merged.items():
            if array.shape[0] != len(batch):
                raise EngineError(f"Output tensor: {name} | batch dimension {array.shape[0]} does not match "
                                  f"the {len(batch)} examples fed")
        elapsed = time.perf_counter() - start
        stage_distribution("inference").update(int(elapsed * 1e6))
        Metrics.counter(NAMESPACE, "batches").inc()
        Metrics.distribution(NAMESPACE, "batch_size").update(len(batch))
        self._histogram.record(elapsed)
        return [PredictionResult(None, {name: array[i] for name, array in merged.items()}, self._model_id)
                for i in range(len(batch))]

    def get_num_bytes(self, batch: Sequence[Example]) -> int:
        if batch and isinstance(batch[0], Mapping):
            return sum(array.nbytes for example in batch for array in example.values())
        return sum(example.nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return self._metrics_namespace

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        kwargs: Dict[str, Any] = {"min_batch_size": self._min_batch_size, "max_batch_size": self._max_batch_size}
        if self._max_batch_duration_secs is not None:
            kwargs["max_batch_duration_secs"] = self._max_batch_duration_secs
        return kwargs

    def share_model_across_processes(self) -> bool:
        return self._share_across_processes

    def model_copies(self) -> int:
        return self._model_copies

    def describe(self) -> Dict[str, Any]:
        """A JSON-able summary for stats.json (no engine is loaded)."""
        return {"loader": repr(self._loader), "min_batch_size": self._min_batch_size,
                "max_batch_size": self._max_batch_size, "share_across_processes": self._share_across_processes,
                "model_copies": self._model_copies}
