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

A started scoring that is never taken (its batch left the process, the model was reloaded, a bundle
failed) still runs to its end: work done twice. Each one is counted when its batch is dropped, and once
:data:`MAX_UNTAKEN` of them outnumber the ones taken, the token starts nothing more in this process and
says so in a warning: a runner that encodes every batch between the two steps gets the work of one
scoring per batch, not two.

Shared state: the registry (``_SCORERS``, locked; each entry's counts are plain integers updated from any
thread, approximate by design). Each started scoring belongs to the batch it was started for.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Dict, Optional, Sequence, Tuple

_LOG = logging.getLogger(__name__)

#: Started scorings dropped untaken, beyond the ones taken, after which a token starts nothing more.
MAX_UNTAKEN = 16


class _Entry:
    """One registered scorer (weakly), the outputs the job's rows are made of, and how its started
    scorings ended."""

    def __init__(self, scorer: Any, outputs: Tuple[str, ...]):
        self.scorer = weakref.ref(scorer)
        self.outputs = outputs
        self.taken = 0
        self.untaken = 0
        self.off = False


#: Token -> its :class:`_Entry`; guarded by ``_LOCK``.
_SCORERS: Dict[str, _Entry] = {}
_LOCK = threading.Lock()
_WARNED: set = set()


class Started:
    """A batch's scoring, started ahead by :func:`start`.

    Attributes:
        scorer: The scorer that scores it: ``RunInference`` takes the result only from the model it holds.
        future: Its :class:`images.scoring.Scored`, or the error scoring raised.
    """

    __slots__ = ("scorer", "future", "_entry", "_taken")

    def __init__(self, scorer: Any, future: Any, entry: Optional[_Entry] = None):
        self.scorer = scorer
        self.future = future
        self._entry = entry
        self._taken = False

    def claim(self) -> None:
        """Marks the result as used by ``RunInference`` (once): it counts as taken even if the call then fails,
        for the batch was scored once and goes to the call's dead letters, not scored again."""
        if not self._taken:
            self._taken = True
            if self._entry is not None:
                self._entry.taken += 1

    def take(self) -> Any:
        """The result (:class:`images.scoring.Scored`), waiting for it; raises what scoring raised."""
        self.claim()
        return self.future.result()

    def __del__(self):
        entry = getattr(self, "_entry", None)
        if entry is None or getattr(self, "_taken", True):
            return
        entry.untaken += 1
        if not entry.off and entry.untaken >= MAX_UNTAKEN and entry.untaken > entry.taken:
            entry.off = True  # no lock here: __del__ may run on a thread that holds _LOCK


def register(token: str, scorer: Any, outputs: Sequence[str]) -> None:
    """Makes ``scorer`` the one readers of this process start batches on under ``token`` (the last
    registered wins: a reloaded model replaces the one before). Held weakly: a scorer nobody else holds
    any more scores nothing ahead."""
    with _LOCK:
        _SCORERS[token] = _Entry(scorer, tuple(outputs))


def unregister(token: str) -> None:
    with _LOCK:
        _SCORERS.pop(token, None)


def _lookup(token: str) -> Tuple[Optional[_Entry], Optional[Any]]:
    """The entry under ``token`` and its scorer if still alive (each None where there is none)."""
    with _LOCK:
        entry = _SCORERS.get(token)
    return entry, (entry.scorer() if entry is not None else None)


def scorer_for(token: str) -> Optional[Any]:
    """The scorer registered under ``token`` in this process and still alive, or None."""
    return _lookup(token)[1]


def start(token: str, batch: Any) -> Optional[Started]:
    """Starts scoring ``batch`` (a ``transforms.images.ImageBatch``) on the scorer registered under
    ``token``; None when there is none in this process, when this process's started scorings went
    mostly untaken (:data:`MAX_UNTAKEN`), or when the scorer refused (closed, a bad batch): the batch is
    then scored by ``RunInference`` as usual, which reports any error with the batch's images."""
    entry, scorer = _lookup(token)
    if scorer is None:
        return None
    if entry.off:
        _warn_once(token, "untaken", f"{entry.untaken} batches started ahead were never taken by RunInference "
                                     f"(this runner passes batches between processes, or bundles failed), against "
                                     f"{entry.taken} taken: this process no longer scores batches ahead, which would "
                                     f"score them twice; --no_score_ahead says so from the start")
        return None
    try:
        future = scorer.score_ahead((batch.pixels, batch.encoded, batch.boxes), entry.outputs)
    except Exception as e:  # RunInference scores it and raises the same error with the batch's refs
        _warn_once(token, "refused", f"could not start a batch's scoring ahead ({e!r}); RunInference scores such "
                                     f"batches itself and reports their errors")
        return None
    return Started(scorer, future, entry)


def _warn_once(token: str, what: str, message: str) -> None:
    key = (token, what)
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    _LOG.warning(message)
