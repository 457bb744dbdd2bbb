"""Whether another engine copy fits on its GPU: checked where it loads, against what an identical copy took.

Every SDK process of a GPU worker loads an engine and a DALI decoder of its own unless the model is
shared (Dataflow starts one process per vCPU), and one copy holds about 7 GB at batch 256
(EfficientNet-Lite0, ONNX Runtime fp32; 4.6 GB fp16; ``benchmarks/gpu_memory.py``). Eight of them do
not fit an L4's 24 GB; before this check such a job loaded, then ran out of memory mid-run and crawled
(benchmarks/NOTES.md, "Issue 14"). So a copy is loaded like this, under a lock per GPU (a file in the
temp directory, shared by the machine's processes, beside ``engines.devices``'s counter):

1. what an identical copy (the same loader: model, batch, precision, decoder) took on this GPU is read
   from the GPU's ledger, if one loaded here before;
2. when the GPU's free memory is below that, plus :data:`MARGIN`, the load stops with an
   :class:`EngineError` naming the fix, before it allocates anything more;
3. otherwise the copy loads its decoder and runs one full batch through decoder and engine (ONNX
   Runtime's activations and DALI's buffers are allocated then), and what the GPU's free memory fell by
   is written to the ledger for the next copy (the most any identical copy took).

A copy whose figure is known does not wait for the others: copies that fit the GPU's free memory by their
figures (less what the loads in progress have still to take) load side by side, and only a copy that would
not fit waits for them, then is checked again against the memory they left. A copy without a figure (the
first on a GPU, or the first in a day) loads alone, so that what it records is its own; so does the
measurement of a copy that loaded beside others, which is not recorded. The configurations the docs
recommend (one process per GPU, or ``--share_model_across_processes``) load one copy per GPU and wait for
nobody. The loads in progress are in the ledger by process id; one whose process died, or registered more
than :data:`LOAD_MAX_S` ago, no longer counts.

What the figure is not: it leaves out what the engine took before the lock (its CUDA context and weights,
~0.5 GB) and the decoded batches waiting for their callers (at most ``images.decoder_service.MAX_BUFFERS``
of them, 231 MB at batch 256), which :data:`MARGIN` covers. The warm-up photos are 2 Mpx; the decoder's
buffers grow with the largest photo it decodes, so batches of much larger photos take more than recorded.
Processes already scoring on the GPU may allocate or free memory during a load's measurement, which moves
the figure; the ledger keeps the most a copy took, for :data:`MAX_AGE_S`. GPUs are told apart by their index
in the process: processes of one machine that see different ``CUDA_VISIBLE_DEVICES`` share a ledger per
index, not per card. Nothing here imports a GPU library at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from typing import Callable, Iterator, Optional, Tuple

from engines.base import EngineError

_LOG = logging.getLogger(__name__)

GIB = 1 << 30
#: Free memory asked for beyond what an identical copy took: its CUDA context and weights, loaded before
#: the measurement, and the growth of batches with larger images than the warm-up's.
MARGIN = GIB // 2

#: A figure older than this is not held against a load: drivers, code and models change between days.
MAX_AGE_S = 86400

#: What to do when a copy does not fit (the error's second half).
FIX = ("run fewer engine copies per GPU: on Dataflow one per GPU with --share_model_across_processes "
       "(--model_copies N for N GPUs) or --experiments=no_use_multiple_sdk_containers; locally fewer "
       "--direct_num_workers with multi_processing; or a copy that needs less: --precision fp16, a smaller "
       "--batch_size")


def free_memory(device: int) -> Tuple[int, int]:
    """(free, total) bytes of GPU ``device`` (``cudaMemGetInfo``; makes ``device`` current on this thread).

    Raises:
        ImportError: cuda-python is missing (the message names the fix).
        EngineError: the CUDA call failed.
    """
    from engines.cuda import check, cudart, set_device

    set_device(device)
    free, total = check(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


class GpuMemoryLedger:
    """What copies took on one GPU, by loader, in a JSON file; :meth:`loading` holds the GPU's lock.

    Shared state: the ledger file, read and written only inside :meth:`loading`, under an exclusive
    ``flock`` on it (the machine's processes and threads each take it in turn).

    Args:
        device: The GPU index.
        directory: Where the ledger lives. Default: the temp directory (see the module docstring).
        free: ``(device) -> (free, total)`` bytes. Default :func:`free_memory`.
    """

    def __init__(self, device: int, directory: str = "", free: Callable[[int], Tuple[int, int]] = free_memory):
        self.device = device
        self.path = os.path.join(directory or tempfile.gettempdir(), f"engines-gpu{device}-memory.json")
        self._free = free

    @contextlib.contextmanager
    def loading(self, key: str, what: str) -> Iterator[None]:
        """Around loading and warming up one copy: refuses it when it cannot fit, records what it took.

        A copy whose figure is known loads side by side with other copies when the GPU's free memory, less the
        figures of the loads still in progress, holds it (+ :data:`MARGIN`); otherwise it waits for them to
        finish and checks again. A copy without a figure waits until no load is in progress and loads alone,
        so that what it records is its own.

        Args:
            key: Identifies identical copies (:func:`loader_key`).
            what: The copy in words, for the error ("an onnxruntime engine + DALI decoder at batch 256").

        Raises:
            EngineError: the GPU's free memory is below what an identical copy took here, plus MARGIN, with
                no other load in progress that could be waited for.
        """
        import fcntl

        try:
            f = open(self.path, "a+")
        except OSError as e:  # another user's ledger, a folder in its place: load, unchecked, and say so
            _LOG.warning("cannot use the GPU memory ledger %s (%s): loading %s without the free-memory check",
                         self.path, e, what)
            yield
            return
        token = f"{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        with f:
            waited = False
            while True:
                fcntl.flock(f, fcntl.LOCK_EX)
                try:
                    ledger = _read(f)
                    group = _loads_in_progress(ledger)
                    others = group["loads"]
                    entry = ledger.get(key)
                    fresh = isinstance(entry, dict) and time.time() - float(entry.get("at", 0)) < MAX_AGE_S
                    took = int(entry["bytes"]) if fresh else None
                    if took is None and not others:
                        # No figure: load alone, holding the lock, and record what it took (as every copy once did).
                        before, _ = self._free(self.device)
                        yield
                        self._record(f, _read(f), key, None, before, what)
                        return
                    if took is not None:
                        before, total = self._free(self.device)
                        if not others:
                            group = {"free_at_start": before, "took": 0, "loads": {}}
                        # What the loads in progress have still to take: their figures, less what the free memory
                        # fell by since the first of them started.
                        pending = max(0, group["took"] - (group["free_at_start"] - before))
                        if before - pending >= took + MARGIN:
                            group["took"] += took
                            group["loads"][token] = {"bytes": took, "pid": os.getpid(), "at": time.time(),
                                                     "alone": not others}
                            ledger[_LOADING] = group
                            ledger[_STARTED] = int(ledger.get(_STARTED, 0)) + 1
                            started = ledger[_STARTED]
                            _write(f, ledger)
                            if others:
                                _LOG.info("loading %s beside %d other load(s) on GPU %d (%s free, %s of it still "
                                          "theirs to take)", what, len(others), self.device, _gib(before),
                                          _gib(pending))
                            break
                        if not others:
                            raise EngineError(
                                f"GPU {self.device} has {_gib(before)} free of {_gib(total)}, and {what} took "
                                f"{_gib(took)} when an identical copy loaded on it (+{_gib(MARGIN)} margin): this "
                                f"copy does not fit; {FIX}")
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                if not waited:
                    _LOG.info("%s waits for %d load(s) in progress on GPU %d", what, len(others), self.device)
                    waited = True
                time.sleep(POLL_S)
            # Loading beside others (or alone, with nobody joining): the lock is not held meanwhile.
            try:
                yield
            except BaseException:
                self._finish(f, token, key, None, what)
                raise
            self._finish(f, token, key, (started, before), what)

    def _finish(self, f, token: str, key: str, measured: Optional[Tuple[int, int]], what: str) -> None:
        """Ends a registered load: removes its share, and records what it took if it loaded alone throughout
        (``measured``: the load count when it started and the free memory then; None after a failure)."""
        import fcntl

        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            ledger = _read(f)
            group = _loads_in_progress(ledger)
            mine = group["loads"].pop(token, None)
            if mine is not None and measured is None:
                group["took"] = max(0, group["took"] - int(mine["bytes"]))  # a failed load freed what it took
            ledger[_LOADING] = group
            alone = measured is not None and bool(mine and mine.get("alone")) \
                and int(ledger.get(_STARTED, 0)) == measured[0]
            if alone:
                self._record(f, ledger, key, int(mine["bytes"]), measured[1], what)
            else:
                _write(f, ledger)
                if measured is not None:
                    _LOG.info("%s loaded beside other copies on GPU %d: what the free memory fell by mixes their "
                              "loads, so the ledger keeps its figure", what, self.device)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

    def _record(self, f, ledger: dict, key: str, took: Optional[int], before: int, what: str) -> None:
        """Writes what a copy that loaded alone took (the most any identical copy took, within MAX_AGE_S)."""
        after, total = self._free(self.device)
        ledger[key] = {"bytes": max(took or 0, before - after), "at": time.time()}
        _write(f, ledger)
        _LOG.info("%s took %s of GPU %d; %s of %s free now", what, _gib(before - after), self.device, _gib(after),
                  _gib(total))


#: The ledger's record of the loads in progress: the GPU's free memory when the first of them started, the sum of
#: their figures, and each load by token: {"bytes", "pid", "at", "alone"}.
_LOADING = "loading"
#: The ledger's count of registered loads, so a load can tell whether another started beside it.
_STARTED = "loads_started"
#: Seconds between looks at the ledger while a copy waits for loads in progress.
POLL_S = 0.1
#: A load registered longer ago than this no longer counts (its process hung or died mid-load).
LOAD_MAX_S = 600


def _read(f) -> dict:
    f.seek(0)
    try:
        ledger = json.loads(f.read() or "{}")
    except ValueError:  # a torn file: start again
        return {}
    return ledger if isinstance(ledger, dict) else {}  # JSON, but not a ledger: start again


def _write(f, ledger: dict) -> None:
    f.seek(0)
    f.truncate()
    f.write(json.dumps(ledger))
    f.flush()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):  # another user's process (EPERM), or not a pid
        return True
    return True


def _loads_in_progress(ledger: dict) -> dict:
    """The ledger's group of loads in progress: ``{"free_at_start", "took", "loads"}``, where ``loads`` keeps only
    the loads of live processes registered within LOAD_MAX_S (a process killed mid-load, by the OOM killer say,
    leaves its entry behind: it is dropped here), and the group starts again when none is left."""
    group = ledger.get(_LOADING)
    loads = group.get("loads") if isinstance(group, dict) else None
    now = time.time()
    live = {token: load for token, load in (loads.items() if isinstance(loads, dict) else ())
            if isinstance(load, dict) and now - float(load.get("at", 0)) < LOAD_MAX_S and _alive(load.get("pid"))}
    if not live:
        return {"free_at_start": 0, "took": 0, "loads": {}}
    return {"free_at_start": int(group.get("free_at_start", 0)), "took": int(group.get("took", 0)), "loads": live}


def loader_key(loader) -> str:
    """A key for identical copies: the digest of the loader's repr (frozen dataclasses: every field)."""
    return hashlib.sha256(repr(loader).encode()).hexdigest()[:16]


def ledger_for(device: Optional[int]) -> Optional[GpuMemoryLedger]:
    """The ledger of GPU ``device``, or None on the CPU or where cuda-python is missing (logged)."""
    if device is None:
        return None
    try:
        from engines.devices import cuda_runtime

        cuda_runtime()
    except ImportError as e:
        _LOG.warning("cannot check the free memory of GPU %d before loading: %s", device, e)
        return None
    return GpuMemoryLedger(device)
