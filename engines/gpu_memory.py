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

Loads of processes that share a GPU thus run one after another; the configurations the docs recommend
(one process per GPU, or ``--share_model_across_processes``) load one copy per GPU and wait for nobody.

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

        Args:
            key: Identifies identical copies (:func:`loader_key`).
            what: The copy in words, for the error ("an onnxruntime engine + DALI decoder at batch 256").

        Raises:
            EngineError: the GPU's free memory is below what an identical copy took here, plus MARGIN.
        """
        import fcntl
        import time

        try:
            f = open(self.path, "a+")
        except OSError as e:  # another user's ledger, a folder in its place: load, unchecked, and say so
            _LOG.warning("cannot use the GPU memory ledger %s (%s): loading %s without the free-memory check",
                         self.path, e, what)
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                try:
                    ledger = json.loads(f.read() or "{}")
                except ValueError:  # a torn file: start again
                    ledger = {}
                if not isinstance(ledger, dict):  # JSON, but not a ledger
                    ledger = {}
                entry = ledger.get(key)
                fresh = isinstance(entry, dict) and time.time() - float(entry.get("at", 0)) < MAX_AGE_S
                took = int(entry["bytes"]) if fresh else None
                before, total = self._free(self.device)
                if took is not None and before < took + MARGIN:
                    raise EngineError(
                        f"GPU {self.device} has {_gib(before)} free of {_gib(total)}, and {what} took "
                        f"{_gib(took)} when an identical copy loaded on it (+{_gib(MARGIN)} margin): this copy "
                        f"does not fit; {FIX}")
                yield
                after, _ = self._free(self.device)
                # The most a copy took (within MAX_AGE_S): its need never shrinks.
                ledger[key] = {"bytes": max(took or 0, before - after), "at": time.time()}
                f.seek(0)
                f.truncate()
                f.write(json.dumps(ledger))
                f.flush()
                _LOG.info("%s took %s of GPU %d; %s of %s free now", what, _gib(before - after), self.device,
                          _gib(after), _gib(total))
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


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
