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

A copy whose figure is known does not wait for the others: while the GPU's free memory, less the whole
figures of the loads in progress (they may have taken little of them yet, and other processes may allocate
meanwhile: counting them whole keeps the check as strict as loading one after another), holds it, it loads
side by side with them; a copy that would not fit waits for them and is then checked again. A copy without a
figure (the first on a GPU, or the first in a day) loads alone, so that what it records is its own, and
while it waits no copy starts beside the loads in progress; the measurement of a copy that loaded beside
others is not recorded. The configurations the docs recommend (one process per GPU, or
``--share_model_across_processes``) load one copy per GPU and wait for nobody. Loads in progress and
waiting copies are in the ledger by process id; one whose process died (where its pid can be checked: the
same pid namespace), or registered more than :data:`LOAD_MAX_S` ago, no longer counts.

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
import functools
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
        whole figures of the loads in progress, holds it (+ :data:`MARGIN`); otherwise it waits for them to
        finish and is checked again. A copy without a figure waits until no load is in progress and loads
        alone, so that what it records is its own; while it waits, no other copy starts beside the loads in
        progress, so it cannot be kept waiting by copies that keep arriving.

        Args:
            key: Identifies identical copies (:func:`loader_key`).
            what: The copy in words, for the error ("an onnxruntime engine + DALI decoder at batch 256").

        Raises:
            EngineError: the GPU's free memory is below what an identical copy took here, plus MARGIN, with
                no other load in progress that could be waited for.
        """
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
            try:
                while True:
                    with _locked(f):
                        ledger = _read(f)
                        group = _in_progress(ledger)
                        loads, waiting = group["loads"], group["waiting"]
                        was_waiting = waiting.pop(token, None) is not None
                        entry = ledger.get(key)
                        fresh = isinstance(entry, dict) and time.time() - float(entry.get("at", 0)) < MAX_AGE_S
                        took = int(entry["bytes"]) if fresh else None
                        if took is None and not loads:
                            # No figure: load alone, holding the lock, and record what it took.
                            if was_waiting:
                                ledger[_LOADING] = group
                                _write(f, ledger)  # this copy no longer waits
                            before, _ = self._free(self.device)
                            yield
                            self._record(f, key, None, before, what, locked=True)
                            return
                        if took is None:
                            waiting[token] = _registration()  # no copy starts beside the loads while this waits
                            ledger[_LOADING] = group
                            _write(f, ledger)
                        elif not waiting:
                            before, total = self._free(self.device)
                            # The loads in progress may have taken little of their figures yet: count them whole.
                            pending = sum(int(load["bytes"]) for load in loads.values())
                            if before - pending >= took + MARGIN:
                                loads[token] = {**_registration(), "bytes": took, "alone": not loads}
                                ledger[_LOADING] = group
                                ledger[_STARTED] = started = int(ledger.get(_STARTED, 0)) + 1
                                _write(f, ledger)
                                if len(loads) > 1:
                                    _LOG.info("loading %s beside %d other load(s) on GPU %d (%s free, up to %s of "
                                              "it theirs)", what, len(loads) - 1, self.device, _gib(before),
                                              _gib(pending))
                                break
                            if not loads:
                                raise EngineError(
                                    f"GPU {self.device} has {_gib(before)} free of {_gib(total)}, and {what} took "
                                    f"{_gib(took)} when an identical copy loaded on it (+{_gib(MARGIN)} margin): "
                                    f"this copy does not fit; {FIX}")
                    if not waited:
                        _LOG.info("%s waits for %d load(s) in progress on GPU %d", what, len(loads) + len(waiting),
                                  self.device)
                        waited = True
                    time.sleep(POLL_S)
            except BaseException:
                if waited:
                    self._end(f, token)  # a copy that stopped waiting (an error, an interrupt) leaves no mark
                raise
            # Loading beside others (or alone, with nobody joining): the lock is not held meanwhile.
            try:
                yield
            except BaseException:
                self._end(f, token)
                raise
            alone = self._end(f, token, started)
            if alone:
                self._record(f, key, took, before, what, locked=False)
            else:
                _LOG.info("%s loaded beside other copies on GPU %d: what the free memory fell by mixes their "
                          "loads, so the ledger keeps its figure", what, self.device)

    def _end(self, f, token: str, started: Optional[int] = None) -> bool:
        """Removes a load's (or a waiting copy's) registration; True when a load that started as number
        ``started`` was alone throughout (nobody was loading when it started and nobody started since)."""
        with _locked(f):
            ledger = _read(f)
            group = _in_progress(ledger)
            mine = group["loads"].pop(token, None)
            group["waiting"].pop(token, None)
            ledger[_LOADING] = group
            _write(f, ledger)
        return started is not None and bool(mine and mine.get("alone")) and int(ledger.get(_STARTED, 0)) == started

    def _record(self, f, key: str, took: Optional[int], before: int, what: str, locked: bool) -> None:
        """Writes what a copy that loaded alone took: the most any identical copy took (within MAX_AGE_S).

        Args:
            locked: Whether the caller holds the ledger's lock (else it is taken here).
        """
        after, total = self._free(self.device)
        with contextlib.nullcontext() if locked else _locked(f):
            ledger = _read(f)
            ledger[key] = {"bytes": max(took or 0, before - after), "at": time.time()}
            _write(f, ledger)
        _LOG.info("%s took %s of GPU %d; %s of %s free now", what, _gib(before - after), self.device, _gib(after),
                  _gib(total))


#: The ledger's record of the copies loading side by side and of those waiting to load alone, by token:
#: {"loads": {token: {"bytes", "pid", "pid_namespace", "at", "alone"}}, "waiting": {token: {...}}}.
_LOADING = "loading"
#: The ledger's count of registered loads, so a load can tell whether another started beside it.
_STARTED = "loads_started"
#: Seconds between looks at the ledger while a copy waits for loads in progress.
POLL_S = 0.1
#: A registration older than this no longer counts (its process hung, or died where its pid cannot be checked).
LOAD_MAX_S = 600


@contextlib.contextmanager
def _locked(f) -> Iterator[None]:
    """Holds an exclusive ``flock`` on the open ledger file ``f``."""
    import fcntl

    fcntl.flock(f, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=1)
def _pid_namespace() -> str:
    """This process's pid namespace ("" where /proc does not say): a pid means this process only in it.
    Read once: it does not change while the process runs."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _registration() -> dict:
    return {"pid": os.getpid(), "pid_namespace": _pid_namespace(), "at": time.time()}


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


def _live(registration) -> bool:
    """Whether a registration still counts: younger than LOAD_MAX_S and, where its pid can be checked (the same
    pid namespace: processes in other containers that share the ledger's folder have their own), of a live
    process (one killed mid-load, by the OOM killer say, leaves its registration behind)."""
    if not isinstance(registration, dict) or time.time() - float(registration.get("at", 0)) >= LOAD_MAX_S:
        return False
    ours = _pid_namespace()
    if not ours or registration.get("pid_namespace") != ours:
        return True
    try:
        os.kill(int(registration.get("pid")), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):  # another user's process (EPERM), or not a pid
        return True
    return True


def _in_progress(ledger: dict) -> dict:
    """The ledger's live registrations: ``{"loads": {...}, "waiting": {...}}``."""
    group = ledger.get(_LOADING)
    group = group if isinstance(group, dict) else {}
    return {part: {token: r for token, r in (group.get(part) or {}).items() if _live(r)}
            if isinstance(group.get(part), dict) else {} for part in ("loads", "waiting")}


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
