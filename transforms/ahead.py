"""Scoring ahead: a batch starts through the decoder and the engine as soon as its files are read.

Beam runs a fused stage's DoFns one after another on one bundle thread: the reader emits a batch,
``RunInference`` scores it, the rows are made and written, and only then is the next batch taken. The
engine waited through the rows, the writing and Beam's own work for every call (at 200,000 images one
bundle thread kept the engine 45% busy, benchmarks/NOTES.md). Here the reader's threads, which read
several batches ahead of the bundle thread anyway (``--prefetch``), hand each batch to the loaded scorer
the moment its last file is read; the scorer decodes and scores it on a thread of its own
(``images.scoring.ImageScorer.score_ahead``), and ``RunInference`` takes the result when the batch reaches
it, or waits for it. The rows are the same: the same scorer scores the same batch object.

Both ends meet in this process through a token the pipeline gives the reader and the model handler:
the handler registers the scorer it loaded under it, and the reader looks it up. A batch whose element
leaves the process (a runner that encodes it between the two steps) drops its started scoring when it is
pickled and is scored as before; so does every batch read before the model finished loading, and every
batch of a model shared across processes (the handler then holds a proxy and registers nothing).

Shared state: the registry (``_SCORERS``, locked). Each started scoring belongs to the batch it was
started for.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

_LOG = logging.getLogger(__name__)

#: Token -> (the scorer, weakly, and the outputs the job's rows are made of); guarded by ``_LOCK``.
_SCORERS: Dict[str, Tuple["weakref.ref", Tuple[str, ...]]] = {}
_LOCK = threading.Lock()


class Started:
    """A batch's scoring, started ahead by :func:`start`.

    Attributes:
        scorer: The scorer that scores it: ``RunInference`` takes the result only from the model it holds.
        future: Its :class:`images.scoring.Scored`, or the error scoring raised.
    """

    __slots__ = ("scorer", "future")

    def __init__(self, scorer: Any, future: Any):
        self.scorer = scorer
        self.future = future


def register(token: str, scorer: Any, outputs: Sequence[str]) -> None:
    """Makes ``scorer`` the one readers of this process start batches on under ``token`` (the last
    registered wins: a reloaded model replaces the one before). Held weakly: a scorer nobody else holds
    any more scores nothing ahead."""
    with _LOCK:
        _SCORERS[token] = (weakref.ref(scorer), tuple(outputs))


def unregister(token: str) -> None:
    with _LOCK:
        _SCORERS.pop(token, None)


def scorer_for(token: str) -> Optional[Any]:
    """The scorer registered under ``token`` in this process and still alive, or None."""
    with _LOCK:
        entry = _SCORERS.get(token)
    if entry is None:
        return None
    return entry[0]()


def start(token: str, batch: Any) -> Optional[Started]:
    """Starts scoring ``batch`` (a ``transforms.images.ImageBatch``) on the scorer registered under
    ``token``; None when there is none in this process, or it refused (closed, a bad batch): the batch is
    then scored by ``RunInference`` as usual, which reports any error with the batch's images."""
    with _LOCK:
        entry = _SCORERS.get(token)
    scorer = entry[0]() if entry is not None else None
    if scorer is None:
        return None
    try:
        future = scorer.score_ahead((batch.pixels, batch.encoded, batch.boxes), entry[1])
    except Exception as e:  # RunInference scores it and raises the same error with the batch's refs
        _LOG.debug("could not start scoring a batch ahead (%r); RunInference scores it", e)
        return None
    return Started(scorer, future)
