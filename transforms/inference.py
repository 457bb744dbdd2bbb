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

import dataclasses
import functools
import logging
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from engines.base import Engine, EngineError, EngineLoader
from transforms.images import ImageRef
from transforms.preprocess import PreprocessConfig, preprocess_image
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


@dataclasses.dataclass
class ScoredBatch:
    """The model handler's result for one :class:`transforms.images.ImageBatch`.

    Attributes:
        refs: The batch's refs, in its row order.
        logits: One row per scored image: the refs not in ``failed``, in order.
        failed: Row index -> reason, for images the GPU decoder could not decode.
    """

    refs: Tuple[ImageRef, ...]
    logits: np.ndarray
    failed: Dict[int, str]

    def scored_refs(self) -> List[ImageRef]:
        return [ref for i, ref in enumerate(self.refs) if i not in self.failed]


@dataclasses.dataclass(frozen=True)
class ScorerLoader:
    """A picklable recipe for the image pipeline's model: an engine plus, for GPU decode, a decoder.

    Attributes:
        engine_loader: A picklable callable returning an :class:`Engine`.
        decoder: DALI decoder options, or None when images arrive decoded (``--decode cpu``).
        preprocess: The CPU preprocessing, used only for encoded images that reach a scorer
            without a decoder (see :class:`engines.scoring.ImageScorer`).
    """

    engine_loader: EngineLoader
    decoder: Optional[Any] = None
    preprocess: Optional[PreprocessConfig] = None

    def __call__(self):
        from engines.scoring import ImageScorer

        engine = self.engine_loader()
        decoder = None
        if self.decoder is not None:
            from engines.dali_decoder import DaliDecoder

            try:
                decoder = DaliDecoder(self.decoder)
            except BaseException:
                engine.close()
                raise
        fallback = functools.partial(preprocess_image, config=self.preprocess) if self.preprocess else None
        return ImageScorer(engine, decoder, fallback)


class ImageBatchHandler(ModelHandler[Any, ScoredBatch, Any]):
    """Scores :class:`transforms.images.ImageBatch` elements: each element is already a batch.

    RunInference groups ``batches_per_call`` elements per call so the decoder can decode the
    next batch while the engine runs the current one.

    Args:
        loader: A :class:`ScorerLoader`.
        output_name: The engine output holding the logits (only it is copied back).
        images_per_batch: Images per element, as the reading step forms them (the one batch-size
            decision: the engine's batch, see ``pipelines.classify_images``). Default 32.
        batches_per_call: Elements per ``run_inference`` call. Default 1.
        share_across_processes, model_copies, metrics_namespace, model_id: as for
            :class:`EngineModelHandler`.
    """

    def __init__(self, loader: ScorerLoader, output_name: str = "logits", *, images_per_batch: int = 32,
                 batches_per_call: int = 1,
                 share_across_processes: bool = False, model_copies: int = 1, metrics_namespace: str = "engine",
                 model_id: str = ""):
        super().__init__()
        if images_per_batch < 1 or batches_per_call < 1 or model_copies < 1:
            raise EngineError(f"images_per_batch, batches_per_call and model_copies must be >= 1, got "
                              f"{images_per_batch}, {batches_per_call}, {model_copies}")
        if model_copies > 1 and not share_across_processes:
            raise EngineError("model_copies > 1 needs share_across_processes=True (one copy per GPU)")
        self._loader = loader
        self._output_name = output_name
        self.images_per_batch = images_per_batch
        self._batches_per_call = batches_per_call
        self._share_across_processes = share_across_processes
        self._model_copies = model_copies
        self._metrics_namespace = metrics_namespace
        self._model_id = model_id or repr(loader.engine_loader)
        self._histogram = None

    @property
    def loader(self) -> ScorerLoader:
        return self._loader

    def load_model(self):
        start = time.perf_counter()
        scorer = self._loader()
        _LOG.info("loaded %s in %.2f s: %s", scorer.engine.kind, time.perf_counter() - start, scorer.describe())
        return scorer

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[ScoredBatch]:
        if not batch:
            return []
        if self._histogram is None:
            self._histogram = LatencyHistogram()
        start = time.perf_counter()
        # One method call on the model: with share_across_processes it is a proxy in another process.
        results = model.score([(element.pixels, element.encoded, element.boxes) for element in batch],
                              [self._output_name])
        elapsed = time.perf_counter() - start
        out = []
        for element, result in zip(batch, results):
            scored = len(element) - len(result.failed)
            logits = result.outputs.get(self._output_name)
            if logits is None:
                logits = np.zeros((0, 0), np.float32)
            if logits.shape[0] != scored:
                raise EngineError(f"Output tensor: {self._output_name} | batch dimension {logits.shape[0]} does not "
                                  f"match the {scored} images scored")
            if result.decode_s:
                stage_distribution("decode").update(int(result.decode_s * 1e6))
            stage_distribution("inference").update(int(result.infer_s * 1e6))
            for size in result.engine_calls:
                Metrics.counter(NAMESPACE, "batches").inc()
                Metrics.distribution(NAMESPACE, "batch_size").update(size)
            out.append(ScoredBatch(element.refs, logits, dict(result.failed)))
        self._histogram.record(elapsed / len(batch))
        return out

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        return sum(element.nbytes for element in batch)

    def get_metrics_namespace(self) -> str:
        return self._metrics_namespace

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return {"min_batch_size": self._batches_per_call, "max_batch_size": self._batches_per_call}

    def share_model_across_processes(self) -> bool:
        return self._share_across_processes

    def model_copies(self) -> int:
        return self._model_copies
