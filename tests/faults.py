"""Test-only fault injection: fail chosen bundles on their first attempt, to prove retries lose nothing.

Dataflow (and Beam's BundleBasedDirectRunner) retry a failed bundle and keep only the outputs of
the attempt that succeeded. This hook makes that happen on purpose, one stage at a time, so a test
can check that the committed output of a run with failures equals a clean run's. Nothing in the
production code knows about it: the tests install it, in their own process around an in-process
run, or in a job of its own (the DirectRunners run the pipeline in the launching process, so
patching the classes there reaches every bundle)::

    with faults.injected("decode:100:DIR"):                  # in the test process, undone on exit
        classify_images.run([..., "--runner", "BundleBasedDirectRunner"])

    python -m tests.faults STAGE:PERCENT:DIR[:always|:kill] -- ARGS...
        installs the hook, then runs ``pipelines.classify_images.main(ARGS)`` (the kill tests)

A bundle is named by its first element (a URI), which a retry sees again: the attempt that fails
leaves a marker file in DIR, so the retry passes (``always`` fails every attempt, to make a run
fail for good; ``kill`` SIGKILLs the process instead, as a crash or preemption would). Every
attempt also leaves a marker, so a test can count bundles and failures (:func:`count_attempts`).
Like tests/commit_hooks.py, it wraps what the job calls in this process rather than adding a flag
or a transform to the graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import uuid
import zlib
from typing import Iterator, List, Optional, Tuple

#: Where a fault can be injected; each is raised after the stage has emitted output, so the
#: retry must also discard what the failed attempt produced.
#: read: in the batch reader (ReadImageBatches) at a bundle's second batch, with reads in flight on
#: its threads;
#: decode: in the same DoFn after the bundle's last batch and dead letter were emitted;
#: inference: after the row blocks of a bundle of scored batches were emitted (RunInference itself
#: turns every Exception in its process() into dead letters by design, so a bundle-level failure
#: is raised in the step fused right after it, PredictionRows: on Dataflow that reruns the inference
#: bundle);
#: write: in the sinks after a whole temporary file was written, leaving it orphaned.
STAGES = ("read", "decode", "inference", "write")


class InjectedFault(RuntimeError):
    """The failure this hook raises; a runner retries it like any other."""


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Which stage fails, how often, and where attempts are recorded.

    Args:
        stage: One of :data:`STAGES`.
        percent: Share of bundles (by a hash of their first element) that fail, 1-100.
        marker_dir: A local directory every worker process can write.
        always: Fail every attempt of a chosen bundle (the run fails), not only the first. Default False.
        kill: Kill the process (SIGKILL) at the first chosen bundle instead of raising. Default False.
    """

    stage: str
    percent: int
    marker_dir: str
    always: bool = False
    kill: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"fault stage must be one of {STAGES}, got {self.stage!r}")
        if not 1 <= self.percent <= 100:
            raise ValueError(f"fault percent must be 1-100, got {self.percent}")

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        """``STAGE:PERCENT:DIR[:always|:kill]`` -> a plan.

        Raises:
            ValueError: another form, or a stage or percent out of range.
        """
        parts = text.split(":")
        mode = parts[3] if len(parts) == 4 else ""
        if len(parts) not in (3, 4) or mode not in ("", "always", "kill") or not parts[1].isdigit():
            raise ValueError(f"a fault spec is STAGE:PERCENT:DIR[:always|:kill], got {text!r}")
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
            sys.stderr.write(f"tests.faults: SIGKILL in the {stage} stage of the bundle starting at {key}\n")
            sys.stderr.flush()
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


#: (class, attribute, replacement) for one patch.
_Patch = Tuple[type, str, object]


def _failing_dofn(cls: type, plan: FaultPlan, mid: Optional[str], end: Optional[str]) -> List[_Patch]:
    """Patches of ``cls`` (a DoFn) failing chosen bundles: mid-bundle (``mid``) or after finish_bundle (``end``).

    The wrappers keep each method's signature (``functools.wraps``): Beam reads ``process``'s
    parameters to pass it the window and timestamp the batch reader asks for.
    """
    start_bundle, process, finish_bundle = cls.start_bundle, cls.process, cls.finish_bundle

    @functools.wraps(start_bundle)
    def faulty_start_bundle(self):
        self._fault_first, self._fault_seen, self._fail_mid, self._fail_end = None, 0, False, False
        return start_bundle(self)

    @functools.wraps(process)
    def faulty_process(self, element, *args, **kwargs):
        if self._fault_first is None:
            self._fault_first = _key(element)
            self._fail_mid = mid is not None and plan.should_fail(mid, self._fault_first)
            self._fail_end = end is not None and plan.should_fail(end, self._fault_first)
        self._fault_seen += 1
        if self._fail_mid and self._fault_seen == 2:
            raise InjectedFault(f"injected {mid} fault in the bundle starting at {self._fault_first}")
        yield from process(self, element, *args, **kwargs) or ()

    @functools.wraps(finish_bundle)
    def faulty_finish_bundle(self):
        if self._fault_first is not None and self._fail_mid:  # a one-element bundle fails here
            raise InjectedFault(f"injected {mid} fault in the bundle starting at {self._fault_first}")
        yield from finish_bundle(self) or ()
        if self._fault_first is not None and self._fail_end:
            raise InjectedFault(f"injected {end} fault after the bundle starting at {self._fault_first}")

    return [(cls, "start_bundle", faulty_start_bundle), (cls, "process", faulty_process),
            (cls, "finish_bundle", faulty_finish_bundle)]


def _failing_sink(cls: type, plan: FaultPlan) -> List[_Patch]:
    """Patches of ``cls`` (a fileio.FileSink) that, for chosen bundles, write and flush the whole
    file and then fail."""
    open_, write, flush = cls.open, cls.write, cls.flush

    @functools.wraps(open_)
    def faulty_open(self, fh):
        self._fault_first = None
        return open_(self, fh)

    @functools.wraps(write)
    def faulty_write(self, record):
        if self._fault_first is None:
            self._fault_first = _key(record)
        return write(self, record)

    @functools.wraps(flush)
    def faulty_flush(self):
        flush(self)
        if self._fault_first is not None and plan.should_fail("write", self._fault_first):
            raise InjectedFault(f"injected write fault after writing the file starting at {self._fault_first}")

    return [(cls, "open", faulty_open), (cls, "write", faulty_write), (cls, "flush", faulty_flush)]


def _patches(plan: FaultPlan) -> List[_Patch]:
    """What to patch for ``plan``'s stage: the classes ``pipelines.classify_images`` builds its graph from."""
    if plan.stage in ("read", "decode"):
        from transforms.images import ReadImageBatches

        return _failing_dofn(ReadImageBatches, plan, mid="read" if plan.stage == "read" else None,
                             end="decode" if plan.stage == "decode" else None)
    if plan.stage == "inference":
        from transforms.postprocess import PredictionRows

        return _failing_dofn(PredictionRows, plan, mid=None, end="inference")
    from transforms.sinks import JsonLinesSink, ParquetSink

    return _failing_sink(JsonLinesSink, plan) + _failing_sink(ParquetSink, plan)


_MISSING = object()


@contextlib.contextmanager
def injected(spec: str) -> Iterator[FaultPlan]:
    """Fails chosen bundles of every pipeline this process runs inside the ``with`` block.

    Args:
        spec: ``STAGE:PERCENT:DIR[:always|:kill]`` (:meth:`FaultPlan.parse`).

    Yields:
        The plan.

    Raises:
        ValueError: a bad spec, before anything is patched.
    """
    plan = FaultPlan.parse(spec)
    patches = _patches(plan)
    saved = [(cls, name, cls.__dict__.get(name, _MISSING)) for cls, name, _ in patches]
    for cls, name, replacement in patches:
        setattr(cls, name, replacement)
    try:
        yield plan
    finally:
        for cls, name, original in reversed(saved):
            if original is _MISSING:  # inherited (DoFn.start_bundle): drop the patch
                delattr(cls, name)
            else:
                setattr(cls, name, original)


def main(argv) -> int:
    split = argv.index("--")
    (spec,), args = argv[:split], argv[split + 1:]
    with injected(spec):
        from pipelines import classify_images

        return classify_images.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
