"""Which GPU an engine copy (and the decoder that feeds it) uses.

Every engine copy a worker loads goes through one ``load_model`` call: one per SDK process
(Dataflow starts several per worker; locally ``--direct_running_mode multi_processing
--direct_num_workers N``), or ``--model_copies`` copies of a model shared across processes. With
``device="auto"`` (what the recipes use on a GPU) consecutive copies land on consecutive GPUs (a
counter file locked across the machine's processes), so N processes or copies on N GPUs put one
engine on each; the DALI decoder of a copy follows its engine's GPU
(``transforms.inference.ScorerLoader``). ``CUDA_VISIBLE_DEVICES`` limits the GPUs a job sees.
The counter lives in ``tempfile.gettempdir()``, where Beam's ``MultiProcessShared`` (behind
``--share_model_across_processes``) keeps its lock and address files: it is shared by exactly the
processes that can share a model.
Nothing here imports a GPU library at import time.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Union

from engines.base import EngineError

_LOG = logging.getLogger(__name__)

#: A GPU index, or "auto" for round-robin over the machine's GPUs.
Device = Union[int, str]


#: What to install when cuda-python is missing.
CUDA_PYTHON_HINT = ("pip install cuda-python matching the CUDA driver (cuda-python==12.* for CUDA 12 drivers, 13.* "
                    "for CUDA 13), or use the image built from Dockerfile (docs/tensorrt.md)")


def cuda_runtime():
    """cuda-python's CUDA runtime module, in either of its layouts (the one place that imports it).

    ``cuda.bindings.runtime`` from cuda-python 12.6 on; before that (12.4 and 12.5, which setup.py
    allows) the same module was ``cuda.cudart`` (``from cuda import cudart``). cuda-python 13 has
    only the first (docs/tensorrt.md).

    Raises:
        ImportError: neither layout is importable; the message names the fix.
    """
    try:
        from cuda.bindings import runtime
    except ImportError as first:
        try:
            from cuda import cudart as runtime  # type: ignore
        except ImportError:
            raise ImportError(f"cuda-python is not importable ({first}); {CUDA_PYTHON_HINT}") from first
    return runtime


def cuda_device_count() -> int:
    """CUDA devices visible to this process (0 without cuda-python, a driver or a GPU)."""
    try:
        runtime = cuda_runtime()
    except ImportError:
        return 0
    try:
        err, count = runtime.cudaGetDeviceCount()
    except Exception:  # no driver library at all
        return 0
    return int(count) if int(err) == 0 else 0


def next_device(count: int, counter_path: str = "") -> int:
    """Round-robin GPU choice shared by every process on this machine (a locked counter file).

    Args:
        count: GPUs visible.
        counter_path: The counter file. Default: one in the temp directory.
    """
    import fcntl

    path = counter_path or os.path.join(tempfile.gettempdir(), "engines-next-device")
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            text = f.read().strip()
            n = int(text) if text.isdigit() else 0
            f.seek(0)
            f.truncate()
            f.write(str(n + 1))
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    return n % max(count, 1)


def check_device(device: Device) -> Device:
    """``device`` if it is "auto" or a GPU index >= 0.

    Raises:
        EngineError: anything else.
    """
    if device == "auto" or (isinstance(device, int) and not isinstance(device, bool) and device >= 0):
        return device
    raise EngineError(f"device must be a GPU index >= 0 or 'auto', got {device!r}")


def resolve_device(device: Device, count: int) -> int:
    """The GPU index for ``device``: itself, or the next one round-robin for "auto".

    Raises:
        EngineError: an index this machine does not have.
    """
    if device == "auto":
        index = next_device(count) if count > 1 else 0  # one GPU (or none): no counter to share
        _LOG.info("device auto: this engine copy goes on GPU %d", index)
    else:
        index = int(device)
    if count and index >= count:
        raise EngineError(f"GPU {index} asked for, but this machine has {count} (indices 0..{count - 1})")
    return index
