"""Post-processing: model outputs -> prediction rows (:class:`RowLayout` says which); failed batches -> dead letters.

Rows are ``{"uri", ["id"], [manifest columns], "model", ...}`` and then, by mode: ``top_k`` (the best k classes of the
ranked output after its activation), ``classes`` (every class at or above ``--threshold``), or one
field per output named after it holding the image's values as a list of floats (``--output_mode raw``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from engines.activations import apply_activation
from transforms.images import DEAD_LETTER, ImageRef, ref_dead_letter, ref_fields
from transforms.timing import NAMESPACE, Progress, stage_distribution

_LOG = logging.getLogger(__name__)


#: Row modes: the best k classes, every class at or above a threshold, or whole outputs.
ROW_MODES = ("topk", "threshold", "raw")


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """What each prediction row holds, decided once from the run's settings; the rows and the sinks'
    schema (``transforms.sinks.prediction_schema``) both follow it.

    Attributes:
        mode: "topk" (the best ``k`` classes, in ``top_k``), "threshold" (every class scoring at or
            above ``threshold``, best first, in ``classes``) or "raw" (each output's values, in a
            field named after it).
        outputs: ``(name, dtype, values per image or None)`` of the outputs read; the ranked one for
            "topk" and "threshold".
        k: Classes per row with "topk". Default 5.
        activation: What turns the ranked output into scores: "softmax", "sigmoid" or "none"
            (``engines.activations``). Default "softmax".
        threshold: The least score kept with "threshold". Default None.
        model: The model's identity, written in every row's ``model`` field. Default "".
        columns: The manifest columns every row carries after ``uri`` and ``id`` (``--keep_columns``).
            Default none.
    """

    mode: str = "topk"
    outputs: Tuple[Tuple[str, str, Optional[int]], ...] = (("logits", "float32", None),)
    k: int = 5
    activation: str = "softmax"
    threshold: Optional[float] = None
    model: str = ""
    columns: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.mode not in ROW_MODES:
            raise ValueError(f"mode must be one of {ROW_MODES}, got {self.mode!r}")
        if self.k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.k}")
        if not self.outputs or (self.mode != "raw" and len(self.outputs) != 1):
            raise ValueError(f"mode {self.mode} reads {'one output' if self.mode != 'raw' else 'outputs'}, "
                             f"got {self.outputs}")
        if (self.mode == "threshold") != (self.threshold is not None):
            raise ValueError("a threshold goes with mode 'threshold' and only with it")

    @classmethod
    def of(cls, model, top_k: int, columns: Sequence[str] = ()) -> "RowLayout":
        """The layout for a run's ``pipelines.model_settings.ModelSettings``, ``--top_k`` and kept columns."""
        mode = "raw" if model.output_mode == "raw" else ("threshold" if model.threshold is not None else "topk")
        return cls(mode, tuple((o.name, o.dtype, o.size) for o in model.outputs), top_k, model.activation,
                   model.threshold, model.identity, tuple(columns))

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(name for name, _, _ in self.outputs)


def _classes(ids, scores, names):
    return [{"class_id": int(c), "label": names[c] if names and c < len(names) else f"class_{int(c)}",
             "score": float(p)} for c, p in zip(ids, scores)]


def _float32_rows(outputs) -> np.ndarray:
    """The model's outputs as float32, one row per image (an image's output flattened)."""
    x = np.asarray(outputs, dtype=np.float32)
    return x if x.ndim == 2 else x.reshape(len(x), -1)


def top_k_batch(logits: np.ndarray, k: int, labels: Optional[Sequence[str]] = None, activation: str = "softmax"):
    """The activation over each row of a (n, classes) batch and its k best classes, best first (vectorized).

    Classes are ranked by score, equal scores by the model's output (as float32), then by class id; a NaN score
    (a broken output) ranks below every number. Each score is the float32 ``engines.activations.apply_activation``
    gives, rounded to 6 places. With a softmax the k are chosen on its exponentials, before they are divided by
    their row's sum (one positive divisor keeps the order), and only the chosen are divided: five numpy passes
    over the batch where there were seven (benchmarks/NOTES.md, "The check's stat and the rows' top-k"). Which
    of several classes whose exponentials are exactly equal at the k-th place is listed is then numpy's choice
    (the same for the same row); with a sigmoid or no activation, such a tie goes by the rule above. The numpy
    facts this relies on, with the tests that check them: docs/top-k.md.

    Args:
        logits: The model's output, one row per image.
        k: How many classes to keep (capped at the number of classes; none when below 1).
        labels: Class names by id, or None.
        activation: "softmax" (default), "sigmoid" or "none" (``engines.activations.apply_activation``).

    Returns:
        One ``[{"class_id", "label", "score"}, ...]`` list per row, best first; ``label`` is
        ``"class_<id>"`` when no labels are known.
    """
    x = _float32_rows(logits)
    n, classes = x.shape
    k = min(k, classes)
    if n == 0 or k < 1:
        return [[] for _ in range(n)]
    if activation == "softmax":
        # apply_activation's softmax, e / e.sum(), divided out for the chosen k only: the same float32 divisions.
        # (Not chosen on the logits: numpy's float32 exp is not monotonic, so a larger logit can score lower.)
        e = x - x.max(axis=1, keepdims=True)
        np.exp(e, out=e)
        best = np.argpartition(e, classes - k, axis=1)[:, classes - k:]
        probs = np.take_along_axis(e, best, axis=1) / e.sum(axis=1, keepdims=True)
    else:
        scores = apply_activation(x, activation)
        best = _best_by_rule(scores, x, k)
        probs = np.take_along_axis(scores, best, axis=1)
    outputs = np.take_along_axis(x, best, axis=1)
    rounded = np.round(probs.astype(np.float64), 6)
    # numpy's sort puts NaN last, so negated a NaN score ranks lowest. A sort in Python would hold the GIL the
    # whole time, and holding it longer is what slowed the GPU job (benchmarks/NOTES.md).
    order = np.lexsort((best, -outputs, -probs), axis=-1)
    names = labels if labels else None
    return [_classes(row_ids, row_scores, names) for row_ids, row_scores in
            zip(np.take_along_axis(best, order, axis=1).tolist(), np.take_along_axis(rounded, order, axis=1).tolist())]


def _best_by_rule(scores: np.ndarray, outputs: np.ndarray, k: int) -> np.ndarray:
    """The ids of each row's k best scores (unordered), ties at the k-th place settled by the output, then the id
    (a sigmoid saturates at 1.0 for many classes); NaN ranks lowest."""
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # negated, NaN sorts last
    cut = np.fmin.reduce(np.take_along_axis(scores, best, axis=1), axis=1, keepdims=True)  # ignores NaN
    with np.errstate(invalid="ignore"):
        tied = np.flatnonzero(np.count_nonzero(scores >= cut, axis=1) > k)
    for row in tied:
        best[row] = np.lexsort((-outputs[row], -scores[row]))[:k]  # a stable sort: then by id
    return best


def above_threshold_batch(logits: np.ndarray, threshold: float, labels: Optional[Sequence[str]] = None,
                          activation: str = "sigmoid"):
    """Every class whose score (after the activation) is at or above ``threshold``, best first, per row.

    Multi-label models give each class an independent score; a row may list none, one or many. Equal scores
    (a sigmoid saturated at 1.0) go by the model's output, then by class id, as in :func:`top_k_batch`.

    Returns:
        One ``[{"class_id", "label", "score"}, ...]`` list per row (possibly empty), best first.
    """
    outputs = _float32_rows(logits)
    probs = apply_activation(outputs, activation)
    names = labels if labels else None
    rows = []
    for row, row_outputs in zip(probs, outputs):
        ids = np.flatnonzero(row >= np.float32(threshold))
        ids = ids[np.lexsort((-row_outputs[ids], -row[ids]))]  # a stable sort of ascending ids: then by id
        rows.append(_classes(ids.tolist(), np.round(row[ids].astype(np.float64), 6).tolist(), names))
    return rows


def raw_values(output: np.ndarray) -> list:
    """One list of floats per image: the output's values for that image, flattened (float16 and float64 as floats)."""
    output = np.asarray(output)
    return output.reshape(len(output), -1).tolist()


class PredictionRows(beam.DoFn):
    """``ScoredBatch`` -> one block (list) of prediction rows as ``layout`` says, and a ``dead_letter``
    row for each image the GPU decoder could not decode.

    Blocks keep Beam's per-element cost off each image; the sink writes a block at once.

    Args:
        layout: What each row holds (:class:`RowLayout`).
        labels: Class names by id, or None.
        progress_dir: Local directory for live progress counts, or None.
    """

    def __init__(self, layout: RowLayout, labels: Optional[Sequence[str]], progress_dir: Optional[str] = None):
        self._layout = layout
        self._labels = list(labels) if labels else None
        self._progress_dir = progress_dir

    def _values(self, outputs: Dict[str, np.ndarray]):
        """Per image, the fields after ``uri``/``id``/``model``."""
        layout = self._layout
        if layout.mode == "raw":
            columns = [raw_values(outputs[name]) for name in layout.output_names]
            return [dict(zip(layout.output_names, values)) for values in zip(*columns)]
        ranked = outputs[layout.output_names[0]]
        if layout.mode == "threshold":
            return [{"classes": c} for c in above_threshold_batch(ranked, layout.threshold, self._labels,
                                                                   layout.activation)]
        return [{"top_k": c} for c in top_k_batch(ranked, layout.k, self._labels, layout.activation)]

    def setup(self):
        self._us = stage_distribution("postprocess")
        self._count = Metrics.counter(NAMESPACE, "predictions")
        self._progress = Progress(self._progress_dir)

    # The main output's type, stated: Beam's inference reads a list built by append() as List[Union[]],
    # which the typed BigQuery step (transforms/bigquery.py to_table_rows) refuses when the job is built.
    def process(self, scored) -> Iterator[List[Dict[str, Any]]]:
        start = time.perf_counter()
        for index, reason in sorted(scored.failed.items()):
            ref = scored.refs[index]
            yield ref_dead_letter(ref, reason, "decode")
        refs = scored.scored_refs()
        if refs:
            rows = []
            for ref, values in zip(refs, self._values(scored.outputs)):
                rows.append({**ref_fields(ref), "model": self._layout.model, **values})
            self._count.inc(len(rows))
            self._progress.add("predictions", len(rows))
            self._us.update(int((time.perf_counter() - start) * 1e6))
            yield rows

    def finish_bundle(self):
        self._progress.flush("predictions")


MAX_REASON_CHARS = 600


def _is_beam_error_tuple(error) -> bool:
    return isinstance(error, tuple) and len(error) == 3 and isinstance(error[0], type)


def describe_failure(exception) -> str:
    """``TypeName: message`` for an exception, or for the ``(type, repr, traceback lines)`` tuple
    that Beam's ``with_exception_handling`` emits in place of the exception object."""
    if isinstance(exception, BaseException):
        text = f"{type(exception).__name__}: {exception}"
    elif _is_beam_error_tuple(exception):
        exc_type, exc_repr, lines = exception
        # The traceback's last line is "module.Type: message", the message exactly as raised.
        last = "".join(lines).rstrip().splitlines()[-1] if lines else ""
        message = last.split(": ", 1)[1] if ": " in last else exc_repr
        text = f"{exc_type.__name__}: {message}"
    else:
        text = str(exception)
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


class FailedBatchToDeadLetters(beam.DoFn):
    """RunInference's failed ``(batch, error)`` -> one dead-letter row per example in the batch.

    ``error`` is what Beam's exception handling emits: ``(type, repr, traceback lines)``
    (or an exception object); the row keeps the type and message, not the whole traceback,
    which goes to the worker log.
    """

    def process(self, failure):
        batch, exception = failure
        reason = f"inference failed for the batch holding this image ({describe_failure(exception)})"
        if "alloc" in reason.lower() or "MemoryError" in reason:
            reason += f"; the batch of {len(batch)} did not fit in memory: lower --batch_size"
        if _is_beam_error_tuple(exception) and exception[2]:
            _LOG.warning("a batch of %d failed in RunInference:\n%s", len(batch), "".join(exception[2]))
        for element in batch:
            refs = element.refs if hasattr(element, "refs") else [element[0]]  # an ImageBatch, or (key, example)
            for key in refs:
                ref = key if isinstance(key, ImageRef) else ImageRef(str(key))
                yield ref_dead_letter(ref, reason, "inference").value


__all__ = ["top_k_batch", "above_threshold_batch", "raw_values", "RowLayout", "PredictionRows",
           "FailedBatchToDeadLetters", "describe_failure", "DEAD_LETTER"]
