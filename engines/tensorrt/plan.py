"""What can be known about a plan without TensorRT or a GPU: its header and its sidecar.

A serialized TensorRT engine ("plan", TensorRT 8.6 and later) starts with the magic
``b"ftrt"`` and carries the TensorRT version that built it in bytes 24-27 (major,
minor, patch, build). ``python -m engines.build`` writes a JSON sidecar
``<plan>.json`` beside each plan with what the runtime and the Beam handler need
(profiles, precision, GPU, ONNX hash, labels); :func:`read_sidecar` reads it on a
laptop, so batch sizes can be chosen before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Sequence

from engines import storage
from engines.base import EngineError
from engines.tensorrt.options import Profile

MAGIC = b"ftrt"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PlanHeader:
    """The TensorRT version recorded in a plan's header."""

    major: int
    minor: int
    patch: int
    build: int

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}.{self.build}"


def read_plan_header(plan: bytes) -> PlanHeader:
    """Reads the TensorRT version from a plan's first 28 bytes.

    Raises:
        EngineError: the bytes are not a TensorRT plan (too short or no ``ftrt`` magic).
    """
    head = bytes(plan[:28])
    if len(head) < 28 or head[:4] != MAGIC:
        raise EngineError(
            f"Not a TensorRT engine: expected the magic bytes {MAGIC!r} at offset 0 and at least 28 bytes, "
            f"got {head[:4]!r} and {len(bytes(plan[:28]))} bytes. Note: pass a plan written by "
            f"`python -m engines.build` (TensorRT 8.6 or later), not an ONNX model")
    return PlanHeader(*head[24:28])


def check_plan_version(header: PlanHeader, runtime_version: Sequence[int],
                       version_compatible: Optional[bool]) -> None:
    """Refuses a plan the runtime cannot load, before touching the GPU.

    Args:
        header: From :func:`read_plan_header`.
        runtime_version: The loaded TensorRT version (major, minor, patch, build).
        version_compatible: Whether the plan was built version-compatible (from its
            sidecar); None when unknown, then only the major version is checked and
            TensorRT itself judges the rest.

    Raises:
        EngineError: another major version; a version-compatible plan from a newer minor
            release; another exact version for a plan that is not version-compatible. The
            message names both versions and the fix.
    """
    have = ".".join(str(v) for v in runtime_version)
    fix = (f"Rebuild the plan with this TensorRT ({have}) on this GPU type, e.g. with --engine_cache or "
           f"`python -m engines.build` inside the image built from Dockerfile")
    if header.major != runtime_version[0]:
        raise EngineError(f"The plan was built by TensorRT {header.version}, but this runtime is TensorRT "
                          f"{have}; plans never load across major versions. {fix}")
    if version_compatible and header.minor > runtime_version[1]:
        raise EngineError(f"The plan was built --version_compatible by TensorRT {header.version}, newer than this "
                          f"runtime (TensorRT {have}); version-compatible plans load only in the same or a later "
                          f"{header.major}.x release. Upgrade the runtime, or rebuild the plan with TensorRT "
                          f"{runtime_version[0]}.{runtime_version[1]} or older")
    if version_compatible is False and (header.major, header.minor, header.patch) != tuple(runtime_version[:3]):
        raise EngineError(f"The plan was built by TensorRT {header.version} without --version_compatible, "
                          f"but this runtime is TensorRT {have}; such plans load only in the exact version "
                          f"that built them. {fix}")


def sidecar_path(plan_path: str) -> str:
    """``model.plan`` -> ``model.plan.json``."""
    return plan_path + SIDECAR_SUFFIX


@dataclasses.dataclass(frozen=True)
class PlanInfo:
    """A plan's sidecar: how it was built and what the runtime needs.

    Attributes:
        tensorrt_version: TensorRT that built it ("10.11.0.33").
        gpu_name: The GPU it was built on ("NVIDIA L4").
        compute_capability: Of that GPU ("8.9").
        profiles: Batch ranges, one per optimisation profile.
        precision: "fp32" or "fp16".
        onnx_sha256: Hex digest of the ONNX model it was built from.
        version_compatible: Built with ``BuilderFlag.VERSION_COMPATIBLE``.
        exclude_lean_runtime: Built with ``BuilderFlag.EXCLUDE_LEAN_RUNTIME``.
        hardware_compatibility: "none", "ampere_plus" or "same_compute_capability".
        labels: Class names from the ONNX model's ``labels`` metadata, or None.
        extra: Everything else in the file (inputs, outputs, build options, metadata).
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profiles: tuple
    precision: str
    onnx_sha256: str
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compatibility: str = "none"
    labels: Optional[tuple] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def max_batch(self) -> int:
        return max(p.max for p in self.profiles)

    def to_json(self) -> Dict[str, Any]:
        data = dict(self.extra)
        data.update(
            format=SIDECAR_FORMAT, tensorrt_version=self.tensorrt_version,
            gpu={"name": self.gpu_name, "compute_capability": self.compute_capability},
            profiles=[p.to_json() for p in self.profiles], precision=self.precision,
            onnx_sha256=self.onnx_sha256, version_compatible=self.version_compatible,
            exclude_lean_runtime=self.exclude_lean_runtime, hardware_compatibility=self.hardware_compatibility,
            labels=list(self.labels) if self.labels is not None else None)
        return data

    @classmethod
    def from_json(cls, data: Dict[str, Any], where: str = "sidecar") -> "PlanInfo":
        try:
            gpu = data["gpu"]
            labels = data.get("labels")
            known = {"format", "tensorrt_version", "gpu", "profiles", "precision", "onnx_sha256",
                     "version_compatible", "exclude_lean_runtime", "hardware_compatibility", "labels"}
            return cls(
                tensorrt_version=str(data["tensorrt_version"]), gpu_name=str(gpu["name"]),
                compute_capability=str(gpu["compute_capability"]),
                profiles=tuple(Profile(int(p["min"]), int(p["opt"]), int(p["max"])) for p in data["profiles"]),
                precision=str(data["precision"]), onnx_sha256=str(data["onnx_sha256"]),
                version_compatible=bool(data.get("version_compatible", False)),
                exclude_lean_runtime=bool(data.get("exclude_lean_runtime", False)),
                hardware_compatibility=str(data.get("hardware_compatibility", "none")),
                labels=tuple(str(x) for x in labels) if labels is not None else None,
                extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{where} is not a plan sidecar written by `python -m engines.build`: "
                              f"missing or bad field {e}") from e


def write_sidecar(plan_path: str, info: PlanInfo) -> str:
    """Writes ``<plan_path>.json``; returns its path."""
    path = sidecar_path(plan_path)
    storage.write_bytes(path, (json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def read_sidecar(plan_path: str, required: bool = True) -> Optional[PlanInfo]:
    """Reads ``<plan_path>.json`` (local or gs://) without TensorRT.

    Args:
        plan_path: The plan's path (the sidecar path is derived from it).
        required: Raise when the sidecar is missing; else return None. Default True.

    Raises:
        EngineError: missing (when ``required``) or malformed sidecar.
    """
    path = sidecar_path(plan_path)
    if not storage.exists(path):
        if required:
            raise EngineError(f"No sidecar {path} beside the plan {plan_path}. Note: `python -m engines.build` "
                              f"writes it; rebuild the plan with it, or copy the .json next to the plan")
        return None
    try:
        data = json.loads(storage.read_bytes(path).decode("utf-8"))
    except ValueError as e:
        raise EngineError(f"Sidecar {path} is not valid JSON: {e}") from e
    return PlanInfo.from_json(data, where=path)
