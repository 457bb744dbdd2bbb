"""Test-only fault injection: fail chosen bundles on their first attempt, to prove retries lose nothing.

Dataflow (and Beam's BundleBasedDirectRunner) retry a failed bundle and keep only the outputs of
the attempt that succeeded. This module makes that happen on purpose, one stage at a time, so a
test can check that the committed output of a run with failures equals a clean run's
(issue 11). It is switched on only by the hidden ``--test_faults STAGE:PERCENT:DIR[:always|:kill]``
flag; without it every function here returns its argument unchanged.

A bundle is named by its first element (a URI), which a retry sees again: the attempt that fails
leaves a marker file in DIR, so the retry passes (``always`` fails every attempt, to make a run
fail for good). Every attempt also leaves a marker, so a test can count bundles and failures.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import uuid
import zlib
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.io import fileio

#: Where a fault can be injected; each is raised after the stage has emitted output, so the
#: retry must also discard what the failed attempt produced.
#: read: in the batch reader (ReadImageBatches) at a bundle's second batch, with reads in flight on
#: its threads;
#: decode: in the same DoFn after the bundle's last batch and dead letter were emitted;
#: inference: after the row blocks of a bundle of scored batches were emitted (RunInference itself
#: turns every Exception in its process() into dead letters by design, so a bundle-level failure
#: is raised in the step fused right after it: on Dataflow that reruns the inference bundle);
#: write: in the sink after a whole temporary file was written, leaving it orphaned.
STAGES = ("read", "decode", "inference", "write")


class InjectedFault(RuntimeError):
    """The failure this module raises; a runner retries it like any other."""


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Which stage fails, how often, and where attempts are recorded.

    Args:
        stage: One of :data:`STAGES`.
        percent: Share of bundles (by a hash of their first element) that fail, 1-100.
        marker_dir: A local directory every worker process can write.
        always: Fail every attempt of a chosen bundle (the run fails), not only the first.
        kill: Kill the worker process (SIGKILL) at the first chosen bundle instead of raising,
            as a crash or preemption would.
    """

    stage: str
    percent: int
    marker_dir: str
    always: bool = False
    kill: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--test_faults stage must be one of {STAGES}, got {self.stage!r}")
        if not 1 <= self.percent <= 100:
            raise ValueError(f"--test_faults percent must be 1-100, got {self.percent}")

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional["FaultPlan"]:
        """``STAGE:PERCENT:DIR[:always|:kill]`` -> a plan; None or "" -> None."""
        if not text:
            return None
        parts = text.split(":")
        mode = parts[3] if len(parts) == 4 else ""
        if len(parts) not in (3, 4) or mode not in ("", "always", "kill") or not parts[1].isdigit():
            raise ValueError(f"--test_faults takes STAGE:PERCENT:DIR[:always|:kill], got {text!r}")
        return cls(parts[0], int(parts[1]), parts[2], mode == "always", mode == "kill")

    def should_fail(self, stage: str, key: str) -> bool:
        """Records one attempt of the bundle named ``key`` and says whether it must fail."""
        if stage != self.stage:
            return False
        digest = f"{zlib.crc32(f'{stage}:{key}'.encode('utf-8')):08x}"
        os.makedirs(self.marker_dir, exist_ok=True)
        open(os.path.join(self.marker_dir, f"attempt-{stage}-{digest}-{uuid.uuid4().hex}"), "w").close()
        if int(digest, 16) % 100 >= self.percent:
            return False
        if self.kill:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if self.always:
            return True
        try:  # O_EXCL: exactly one attempt per bundle creates the marker, and only that one fails
            os.close(os.open(os.path.join(self.marker_dir, f"failed-{stage}-{digest}"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


def count_attempts(marker_dir: str, stage: str) -> Tuple[int, int, int]:
    """(bundles, bundles that failed once, attempts) recorded for ``stage`` in ``marker_dir``."""
    names = os.listdir(marker_dir) if os.path.isdir(marker_dir) else []
    attempts = [n.split("-")[2] for n in names if n.startswith(f"attempt-{stage}-")]
    failed = [n for n in names if n.startswith(f"failed-{stage}-")]
    return len(set(attempts)), len(failed), len(attempts)


def _key(element) -> str:
    """A bundle's name: the URI of its first image.

    Elements are lists of refs (listing to reading), ``ImageBatch``/``ScoredBatch`` (``.refs``),
    blocks (lists) of prediction or fingerprint rows, single dead-letter rows, or a ref.
    """
    if hasattr(element, "refs") and element.refs:  # ImageBatch, ScoredBatch
        element = element.refs[0]
    if isinstance(element, list) and element:  # a batch of refs, a block of rows
        element = element[0]
    if isinstance(element, tuple) and element and hasattr(element[0], "uri"):
        element = element[0]
    if hasattr(element, "uri"):
        return element.uri
    if isinstance(element, dict) and "uri" in element:
        return str(element["uri"])
    return repr(element)[:500]


class _FaultyDoFn(beam.DoFn):
    """Runs ``inner`` and fails chosen bundles: mid-bundle (``mid``) or after finish_bundle (``end``)."""

    def __init__(self, inner: beam.DoFn, plan: FaultPlan, mid: Optional[str], end: Optional[str]):
        self._inner, self._plan, self._mid, self._end = inner, plan, mid, end
        params = inspect.signature(inner.process).parameters
        self._params = [n for n, p in params.items()
                        if p.default in (beam.DoFn.WindowParam, beam.DoFn.TimestampParam)]

    def setup(self):
        self._inner.setup()

    def start_bundle(self):
        self._first, self._seen = None, 0
        self._inner.start_bundle()

    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        given = {"window": window, "timestamp": timestamp}
        kwargs = {n: given[n] for n in self._params if n in given}
        if self._first is None:
            self._first = _key(element)
            self._fail_mid = self._mid is not None and self._plan.should_fail(self._mid, self._first)
            self._fail_end = self._end is not None and self._plan.should_fail(self._end, self._first)
        self._seen += 1
        if self._fail_mid and self._seen == 2:
            raise InjectedFault(f"injected {self._mid} fault in the bundle starting at {self._first}")
        yield from self._inner.process(element, **kwargs) or ()

    def finish_bundle(self):
        if self._first is not None and self._fail_mid:  # a one-element bundle fails here
            raise InjectedFault(f"injected {self._mid} fault in the bundle starting at {self._first}")
        yield from self._inner.finish_bundle() or ()
        if self._first is not None and self._fail_end:
            raise InjectedFault(f"injected {self._end} fault after the bundle starting at {self._first}")

    def teardown(self):
        self._inner.teardown()


def with_faults(dofn: beam.DoFn, plan: Optional[FaultPlan], mid: Optional[str] = None,
                end: Optional[str] = None) -> beam.DoFn:
    """``dofn``, or a wrapper failing chosen bundles at stage ``mid`` (mid-bundle) or ``end``."""
    if plan is None or plan.stage not in (mid, end):
        return dofn
    return _FaultyDoFn(dofn, plan, mid if plan.stage == mid else None, end if plan.stage == end else None)


class _FaultySink(fileio.FileSink):
    """A sink that, for chosen bundles, writes and flushes the whole file and then fails."""

    def __init__(self, inner: fileio.FileSink, plan: FaultPlan):
        self._inner, self._plan = inner, plan

    def open(self, fh):
        self._first = None
        self._inner.open(fh)

    def write(self, record):
        if self._first is None:
            self._first = _key(record)
        self._inner.write(record)

    def flush(self):
        self._inner.flush()
        if self._first is not None and self._plan.should_fail("write", self._first):
            raise InjectedFault(f"injected write fault after writing the file starting at {self._first}")


def sink_wrapper(plan: Optional[FaultPlan]):
    """A ``WriteRows(wrap_sink=...)`` callable for the ``write`` stage, or None."""
    if plan is None or plan.stage != "write":
        return None
    return lambda sink: _FaultySink(sink, plan)
