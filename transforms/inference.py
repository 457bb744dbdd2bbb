"""The Beam ``ModelHandler`` that serves any :class:`engines.base.Engine` to ``RunInference``.

The handler is a small picklable recipe: a :class:`ScorerLoader` (an engine loader such as
:class:`engines.onnxruntime_engine.OnnxRuntimeLoader`, plus decoder options for GPU decode) and
batch settings. No engine object exists until ``load_model()`` runs on the worker; RunInference
then shares the loaded engine across the worker's threads (and, with ``share_across_processes``,
across its processes), so the loaded scorer serves concurrent calls (``images.scoring``). Each
element is a whole :class:`transforms.images.ImageBatch`; each result a :class:`ScoredBatch` with
the outputs of that batch the job asked for.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import threading
import time
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from engines.base import EngineError, EngineLoader
from images.pillow_decoder import PreprocessConfig, preprocess_image
from transforms import ahead
from transforms.images import ImageRef
from transforms.timing import NAMESPACE, LatencyHistogram, device_counter, stage_distribution

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class ScoredBatch:
    """The model handler's result for one :class:`transforms.images.ImageBatch`.

    Attributes:
        refs: The batch's refs, in its row order.
        outputs: Output name -> one row per scored image: the refs not in ``failed``, in order.
        failed: Row index -> reason, for images the GPU decoder could not decode.
    """

    refs: Tuple[ImageRef, ...]
    outputs: Dict[str, np.ndarray]
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
            without a decoder (see :class:`images.scoring.ImageScorer`).
        max_decoders: DALI decoders the loaded scorer builds, each on a thread of its own decoding the
            batches of every caller (``images.decoder_service.Decoders``, ``--max_decoders``). Default 1.
        warmup_images: On a GPU, load under the GPU memory check (``engines.gpu_memory``) and warm up with a
            batch of this many photos. Default 0: neither.
        preload: The token of a :class:`Preload` of this model in the launching process, or "": a load in that
            process takes the preloaded scorer (once) instead of loading another. Not part of the recipe's
            identity (its repr and equality, which the memory check's ledger keys on).
    """

    engine_loader: EngineLoader
    decoder: Optional[Any] = None
    preprocess: Optional[PreprocessConfig] = None
    max_decoders: int = 1
    warmup_images: int = 0
    preload: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        if self.max_decoders < 1:
            raise EngineError(f"max_decoders must be >= 1 (each a DALI decoder on a thread of its own), got "
                              f"{self.max_decoders}; see --max_decoders")

    def __call__(self):
        if self.preload:
            preloaded = _take_preload(self.preload)
            if preloaded is not None:
                start = time.perf_counter()
                scorer = preloaded.result()  # the error its load raised, if it failed
                _LOG.info("took the model preloaded while the job started (waited %.2f s for it)",
                          time.perf_counter() - start)
                return scorer
        return self.load()

    def load(self):
        """Loads a scorer now, whatever was preloaded (what :meth:`__call__` does when there is no preload)."""
        from engines import gpu_memory
        from images.scoring import ImageScorer

        engine = self.engine_loader()
        fallback = functools.partial(preprocess_image, config=self.preprocess) if self.preprocess else None
        decoders = None  # closed with the engine if anything after their build fails
        try:
            ledger = gpu_memory.ledger_for(engine.device_index()) if self.warmup_images else None
            checked = ledger.loading(gpu_memory.loader_key(self), self._describe(engine)) if ledger \
                else contextlib.nullcontext()
            with checked:
                start = time.perf_counter()
                if ledger is None:
                    decoders = self._decoders(engine)
                    scorer = ImageScorer(engine, decoders, fallback)
                else:
                    # The engine's first full batch (ONNX Runtime's convolution search: ~2 s on an H100 host)
                    # runs while the decoder builds (~2 s, mostly Python under the GIL; the engine's run is
                    # not), then one batch goes through decoder and engine together.
                    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="warm-up") as pool:
                        engine_warm = pool.submit(ImageScorer(engine).warm_up, self.warmup_images, self.preprocess)
                        try:
                            decoders = self._decoders(engine)
                        finally:
                            concurrent.futures.wait([engine_warm])  # nothing is closed while it runs
                        engine_warm.result()
                    scorer = ImageScorer(engine, decoders, fallback)
                    scorer.warm_up(self.warmup_images, self.preprocess)
                    _LOG.info("decoder built and warmed up with a batch of %d in %.2f s", self.warmup_images,
                              time.perf_counter() - start)
        except BaseException:
            if decoders is not None:
                decoders.close()
            engine.close()
            raise
        return scorer

    def _decoders(self, engine):
        if self.decoder is None:
            return None
        from images.decoder_service import Decoders

        options = self.decoder
        gpu = engine.device_index()
        if options.device == "gpu" and gpu is not None and gpu != options.device_id:
            # The decoder feeds the engine device arrays: it must sit on the engine's GPU
            # (with --model_copies N, copies spread over the GPUs; engines.devices).
            options = dataclasses.replace(options, device_id=gpu)
        return Decoders(options, self.max_decoders)  # built now: a broken setup fails at load

    def _describe(self, engine) -> str:
        decoder = f" + {self.max_decoders} DALI {self.decoder.device} decoder{'s' * (self.max_decoders > 1)}" \
            if self.decoder is not None else ""
        return f"a {engine.kind} engine{decoder} at batch {self.warmup_images}"


#: Preloads of this process by token (:class:`Preload`); guarded by ``_PRELOADS_LOCK``.
_PRELOADS: Dict[str, "concurrent.futures.Future"] = {}
_PRELOADS_LOCK = threading.Lock()


def _take_preload(token: str) -> Optional["concurrent.futures.Future"]:
    """The preload with ``token``, removed from the table (only one load takes it), or None."""
    with _PRELOADS_LOCK:
        return _PRELOADS.pop(token, None)


class Preload:
    """A job's model, loaded on a thread of its own while the job is built and its inputs are listed.

    When the runner's workers run in the launching process (the DirectRunner's ``in_memory`` and
    ``multi_threading`` modes), the model would load only once the scoring step starts, after the pipeline
    is built and every input listed: seconds in which the GPU does nothing. A preload starts the load
    at once; the first load of :attr:`loader` in this process takes the preloaded scorer, waiting for it
    if it is still loading, or gets the error its load raised. A worker in another process finds no
    preload there and loads its own, so the preload is for in-process runners only (the launcher would
    hold a copy nobody uses).

    Shared state: the process-wide table of preloads (``_PRELOADS``, locked); the loaded scorer belongs to
    whichever load takes it, or to :meth:`close`.

    Args:
        loader: The job's :class:`ScorerLoader`.
    """

    def __init__(self, loader: ScorerLoader):
        self.token = uuid.uuid4().hex
        #: The loader to give the job's model handler: it takes this preload.
        self.loader = dataclasses.replace(loader, preload=self.token)
        self._future: "concurrent.futures.Future" = concurrent.futures.Future()
        with _PRELOADS_LOCK:
            _PRELOADS[self.token] = self._future
        self._thread = threading.Thread(target=self._load, args=(loader,), name="model-preload", daemon=True)
        self._thread.start()

    def _load(self, loader: ScorerLoader) -> None:
        start = time.perf_counter()
        try:
            scorer = loader.load()
        except BaseException as e:  # given to the load that takes the preload, which raises it
            self._future.set_exception(e)
            return
        _LOG.info("preloaded the model in %.2f s while the job started", time.perf_counter() - start)
        self._future.set_result(scorer)

    @property
    def taken(self) -> bool:
        """Whether a load in this process took the preloaded scorer (or its error)."""
        with _PRELOADS_LOCK:
            return self.token not in _PRELOADS

    def close(self) -> None:
        """Closes the preloaded scorer if no load took it (a job that ended before scoring anything), once its
        load has finished; a scorer a load took belongs to the job. Idempotent."""
        untaken = _take_preload(self.token)
        if untaken is None:
            return
        self._thread.join()
        if untaken.exception() is None:
            untaken.result().close()


def model_kind(model: Any) -> str:
    """The engine's kind ("onnxruntime", "tensorrt") for messages; "" for a proxy that does not say."""
    try:
        return str(model.engine.kind)
    except Exception:  # a shared model's proxy exposes methods only
        return "model's"


class ImageBatchHandler(ModelHandler[Any, ScoredBatch, Any]):
    """Scores :class:`transforms.images.ImageBatch` elements: each element is already a batch.

    RunInference groups ``batches_per_call`` elements per call so the decoder can decode the
    next batch while the engine runs the current one.

    Args:
        loader: A :class:`ScorerLoader`.
        output_names: The engine outputs the rows are made of (only they are copied back).
            Default ("logits",).
        images_per_batch: Images per element, as the reading step forms them (the one batch-size
            decision: the engine's batch, ``pipelines.settings.BatchSettings.images``). Default 32.
        batches_per_call: Elements per ``run_inference`` call. Default 1.
        share_across_processes: Share one scorer across a worker's processes (Beam's multi-process
            shared model) instead of one per process. Default False.
        model_copies: With ``share_across_processes``, how many copies a worker holds (e.g. one
            per GPU). Default 1.
        metrics_namespace: Namespace of RunInference's own metrics. Default "engine".
        model_id: A label for the model. Default "" (the engine loader's repr).
        score_ahead: A token to register the loaded scorer under, so the job's reader starts each batch on
            it as soon as the batch is read (``transforms.ahead``); "" = off. Not with
            ``share_across_processes`` (the model is then a proxy of another process). Default "".
    """

    def __init__(self, loader: ScorerLoader, output_names: Sequence[str] = ("logits",), *, images_per_batch: int = 32,
                 batches_per_call: int = 1,
                 share_across_processes: bool = False, model_copies: int = 1, metrics_namespace: str = "engine",
                 model_id: str = "", score_ahead: str = ""):
        super().__init__()
        if images_per_batch < 1 or batches_per_call < 1 or model_copies < 1:
            raise EngineError(f"images_per_batch, batches_per_call and model_copies must be >= 1, got "
                              f"{images_per_batch}, {batches_per_call}, {model_copies}")
        if model_copies > 1 and not share_across_processes:
            raise EngineError("model_copies > 1 needs share_across_processes=True (one copy per GPU)")
        self._loader = loader
        if isinstance(output_names, str) or not output_names:
            raise EngineError(f"output_names must be a non-empty sequence of output names, got {output_names!r}")
        self._output_names = tuple(output_names)
        self.images_per_batch = images_per_batch
        self._batches_per_call = batches_per_call
        self._share_across_processes = share_across_processes
        self._model_copies = model_copies
        self._metrics_namespace = metrics_namespace
        self._model_id = model_id or repr(loader.engine_loader)
        self._score_ahead = "" if share_across_processes else score_ahead
        self._histogram = None

    @property
    def loader(self) -> ScorerLoader:
        return self._loader

    def load_model(self):
        start = time.perf_counter()
        scorer = self._loader()
        _LOG.info("model ready (%s) in %.2f s: %s", scorer.engine.kind, time.perf_counter() - start, scorer.describe())
        if self._score_ahead and hasattr(scorer, "score_ahead"):
            ahead.register(self._score_ahead, scorer, self._output_names)
        return scorer

    def run_inference(self, batch: Sequence[Any], model: Any,
                      inference_args: Optional[Dict[str, Any]] = None) -> Iterable[ScoredBatch]:
        if not batch:
            return []
        if self._histogram is None:
            self._histogram = LatencyHistogram()
        start = time.perf_counter()
        # A batch the reader started on this very model (transforms.ahead) is taken; the rest are scored now,
        # in one method call on the model (with share_across_processes a proxy in another process).
        # A scoring dropped unstarted (the scorer closed under it) is done again here.
        started = [element.scoring if isinstance(element.scoring, ahead.Started) and element.scoring.scorer is model
                   and not element.scoring.future.cancelled() else None for element in batch]
        results: List[Any] = [None] * len(batch)
        now = [i for i, s in enumerate(started) if s is None]
        if len(now) < len(batch):
            # Used by this call, whether or not it succeeds: a failed call's batches were scored once.
            for s in started:
                if s is not None:
                    s.claim()
            Metrics.counter(NAMESPACE, "batches_scored_ahead").inc(len(batch) - len(now))
        if now:
            scored_now = model.score([(batch[i].pixels, batch[i].encoded, batch[i].boxes) for i in now],
                                     list(self._output_names))
            for i, result in zip(now, scored_now):
                results[i] = result
        now_s = time.perf_counter() - start
        for i, s in enumerate(started):
            if s is not None:
                results[i] = s.take()  # what scoring it raised, as the call above would
        # The latency of a batch scored ahead is its decode wait and engine time on the scoring thread, not
        # how long this thread waited for it (nothing, when it was done while earlier rows were written).
        elapsed = now_s + sum(results[i].decode_s + results[i].infer_s
                              for i, s in enumerate(started) if s is not None)
        out = []
        for element, result in zip(batch, results):
            scored = len(element) - len(result.failed)
            outputs = {}
            for name in self._output_names:
                value = result.outputs.get(name)
                if value is None:
                    if scored:
                        raise EngineError(f"Output tensor: {name} | the {model_kind(model)} engine returned no such "
                                          f"output (it returned {sorted(result.outputs)})")
                    value = np.zeros((0, 0), np.float32)
                if value.shape[0] != scored:
                    raise EngineError(f"Output tensor: {name} | batch dimension {value.shape[0]} does not "
                                      f"match the {scored} images scored")
                outputs[name] = value
            if result.decode_s:
                stage_distribution("decode").update(int(result.decode_s * 1e6))
            stage_distribution("inference").update(int(result.infer_s * 1e6))
            for size in result.engine_calls:
                Metrics.counter(NAMESPACE, "batches").inc()
                Metrics.distribution(NAMESPACE, "batch_size").update(size)
            # Which engine copy scored the images: stats.json's images_per_device.
            Metrics.counter(NAMESPACE, device_counter(result.device)).inc(scored)
            out.append(ScoredBatch(element.refs, outputs, dict(result.failed)))
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
