"""A shared cache of plans, so a job can start from an ONNX model alone.

A plan runs only on the GPU type and TensorRT version it was built with, so plans are
keyed by the ONNX model's sha256, the GPU's name and compute capability, the TensorRT
version and :meth:`BuildOptions.cache_key`. The first worker to need a plan builds it
and stores it (with its sidecar) in the cache location, a local directory or a
``gs://`` prefix; later workers and later jobs download it.

Races: processes on one machine take a file lock, so only one of them builds. Workers
on different machines may both build; each uses its own plan and writes it atomically
(temp file + rename locally; a GCS object appears whole when its upload completes),
and a reader accepts a plan only when the sidecar's ``plan_sha256`` matches it, so a
plan and sidecar from two different writers are never paired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import time
from typing import Callable, Optional, Tuple

from engines import storage
from engines.tensorrt.locks import machine_lock
from engines.base import EngineError
from engines.tensorrt.options import BuildOptions
from engines.tensorrt.plan import PlanInfo, read_sidecar, write_sidecar

_LOG = logging.getLogger(__name__)

#: ``build(onnx_bytes, options, device) -> (plan bytes, PlanInfo)``; the real one is
#: :func:`engines.tensorrt.builder.build_plan` (wrapped by :func:`_default_build`).
BuildFn = Callable[[bytes, BuildOptions, int], Tuple[bytes, PlanInfo]]


@dataclasses.dataclass(frozen=True)
class BuildTarget:
    """What a plan is specific to besides the model and options: GPU type and TensorRT version."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str

    @classmethod
    def detect(cls, device: int = 0) -> "BuildTarget":
        """This machine's GPU ``device`` and installed TensorRT (full or lean)."""
        from engines import cuda
        from engines.tensorrt._trt import import_tensorrt

        trt = import_tensorrt(lean_ok=True)
        dev = cuda.device_info(device)
        return cls(dev.name, dev.compute_capability, str(trt.__version__))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def target_key(target: BuildTarget) -> str:
    """GPU type and TensorRT version as a file-name part, e.g. ``nvidia-l4-sm89-trt10.11.0.33``."""
    return f"{_slug(target.gpu_name)}-sm{target.compute_capability.replace('.', '')}-trt{target.tensorrt_version}"


def cache_key(onnx_sha256: str, options: BuildOptions, target: BuildTarget) -> str:
    """The file stem of a cached plan, e.g. ``3f2a...-nvidia-l4-sm89-trt10.11.0.33-9c1e...``."""
    return f"{onnx_sha256[:16]}-{target_key(target)}-{options.cache_key()}"


def timing_cache_path(path: str, target: BuildTarget) -> str:
    """The file of ``--timing_cache PATH`` for one GPU type and TensorRT version: ``PATH.<target_key>``.

    Timings are measurements on one GPU with one TensorRT, and workers of several GPU types may share
    one path (often gs://); each type keeps its own file, so their caches never merge (NVIDIA's
    ``ITimingCache::combine``: "Combining caches generated from devices with different device
    properties may lead to functional/performance bugs!").
    """
    return f"{path}.{target_key(target)}"


def _default_build(onnx_bytes: bytes, options: BuildOptions, device: int) -> Tuple[bytes, PlanInfo]:
    from engines.tensorrt.builder import build_plan

    built = build_plan(onnx_bytes, options, device)
    return built.plan, built.info


class EngineCache:
    """Plans keyed by model, GPU, TensorRT version and build options, built once on a miss.

    Args:
        location: A local directory or a ``gs://`` prefix.
        build: Builds a plan on a miss. Default: :func:`engines.tensorrt.builder.build_plan`.
        lock_timeout_s: How long a process waits for another one on the same machine to
            finish building. Default 3600.
    """

    def __init__(self, location: str, build: Optional[BuildFn] = None, lock_timeout_s: float = 3600.0):
        if not location:
            raise EngineError("EngineCache needs a location: a local directory or gs://bucket/prefix")
        self.location = location
        self._build = build or _default_build
        self._lock_timeout_s = lock_timeout_s

    def plan_path(self, key: str) -> str:
        return storage.join(self.location, f"{key}.plan")

    def lookup(self, key: str, onnx_sha256: str) -> Optional[Tuple[bytes, PlanInfo]]:
        """The cached plan and its info, or None when absent or inconsistent."""
        path = self.plan_path(key)
        if not storage.exists(path):
            return None
        try:
            info = read_sidecar(path, required=False)
        except EngineError as e:
            _LOG.warning("ignoring cached plan %s: %s", path, e)
            return None
        if info is None:
            return None
        plan = storage.read_bytes(path)
        if info.extra.get("plan_sha256") != hashlib.sha256(plan).hexdigest() or info.onnx_sha256 != onnx_sha256:
            _LOG.warning("ignoring cached plan %s: its sidecar belongs to another plan or model (a concurrent "
                         "writer?); building again", path)
            return None
        return plan, info

    def get_or_build(self, onnx_bytes: bytes, options: BuildOptions, device: int = 0,
                     target: Optional[BuildTarget] = None) -> Tuple[bytes, PlanInfo, str]:
        """Returns ``(plan, info, path)`` for this model on this GPU, building and storing it on a miss.

        Args:
            onnx_bytes: The serialized ONNX model.
            options: Build options (part of the key).
            device: GPU index to build on. Default 0.
            target: GPU type and TensorRT version; default :meth:`BuildTarget.detect`.
        """
        target = target or BuildTarget.detect(device)
        onnx_sha = hashlib.sha256(onnx_bytes).hexdigest()
        key = cache_key(onnx_sha, options, target)
        path = self.plan_path(key)
        found = self.lookup(key, onnx_sha)
        if found:
            _LOG.info("engine cache hit: %s", path)
            return found[0], found[1], path
        with machine_lock(f"plan:{key}", self._lock_timeout_s, f"building the plan {key}"):
            found = self.lookup(key, onnx_sha)  # another process here may have built it meanwhile
            if found:
                _LOG.info("engine cache hit after waiting for another process: %s", path)
                return found[0], found[1], path
            _LOG.info("engine cache miss: building %s on %s (this takes minutes, once per GPU type)", path,
                      target.gpu_name)
            start = time.monotonic()
            plan, info = self._build(onnx_bytes, options, device)
            extra = dict(info.extra)
            extra.update(plan_sha256=hashlib.sha256(plan).hexdigest(), cache_key=key)
            info = dataclasses.replace(info, extra=extra)
            storage.write_bytes(path, plan)  # atomic locally; a GCS object appears whole
            write_sidecar(path, info)
            _LOG.info("built and stored %s in %.0f s", path, time.monotonic() - start)
            return plan, info, path
