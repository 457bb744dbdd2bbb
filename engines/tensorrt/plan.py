"""What can be known about a plan without TensorRT or a GPU: its header and its sidecar.

A serialized TensorRT engine ("plan", TensorRT 8.6 and later) starts with the magic
``b"ftrt"``, then its serialization version (bytes 4-7, little-endian); in serialization
version 0 bytes 24-27 hold the TensorRT version that built it (major, minor, patch, build).
That is how trtexec reads it (NVIDIA/TensorRT ``samples/common/sampleEngines.cpp``,
``printPlanVersion``: "Blob index to store the plan version may depend on the serialization
version"), so another serialization version claims no version here. ``python -m model_tools.build``
writes a JSON sidecar ``<plan>.json`` beside each plan with what the runtime and the Beam handler
need (profiles, precision, GPU, ONNX hash, labels); :func:`read_sidecar` reads it on a laptop, so
batch sizes can be chosen before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Sequence

from engines import storage
from engines.base import EngineError
from engines.tensorrt.options import Profile

MAGIC = b"ftrt"
#: The one plan header layout whose version bytes (24-27) are known (trtexec's ``printPlanVersion``).
KNOWN_SERIALIZATION_VERSION = 0
#: (plan major, runtime major) pairs across which NVIDIA supports version-compatible plans: the 11.4
#: support matrix, "Engine Portability": "TensorRT 10 version-compatible engines can run with a
#: TensorRT 11 runtime, and TensorRT 8 version-compatible engines can run with a TensorRT 10 runtime.
#: No other combination across major versions is supported." (docs/tensorrt.md)
CROSS_MAJOR_VERSION_COMPATIBLE = frozenset({(10, 11), (8, 10)})
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


def serialization_version(plan: bytes) -> Optional[int]:
    """The plan header's serialization version (bytes 4-7, little-endian), or None without the magic."""
    head = bytes(plan[:8])
    return int.from_bytes(head[4:8], "little") if head[:4] == MAGIC and len(head) == 8 else None


def read_plan_header(plan: bytes) -> Optional[PlanHeader]:
    """Reads the TensorRT version from a plan's first 28 bytes.

    Returns:
        The header, or None when the bytes do not start with ``b"ftrt"`` or their
        serialization version is not :data:`KNOWN_SERIALIZATION_VERSION` (bytes 24-27 may then
        hold anything): such bytes go to TensorRT, which decides (the caller logs a warning
        and skips the version checks that need the header).

    Raises:
        EngineError: too short to be a plan (under 28 bytes), or an ONNX model.
    """
    head = bytes(plan[:28])
    if len(head) < 28:
        raise EngineError(f"Not a TensorRT engine: {len(head)} bytes, and a plan has at least a 28-byte header. "
                          f"Note: pass a plan written by `python -m model_tools.build`")
    if head[:4] != MAGIC:
        if _looks_like_onnx(plan):
            raise EngineError(
                f"Not a TensorRT engine: expected the magic bytes {MAGIC!r} at offset 0, and these bytes are an "
                f"ONNX model. Note: pass a plan written by `python -m model_tools.build`, or pass the model as "
                f"--onnx_path to build it on the workers")
        return None
    if serialization_version(head) != KNOWN_SERIALIZATION_VERSION:
        return None
    return PlanHeader(*head[24:28])


def unread_header_reason(plan: bytes) -> str:
    """Why :func:`read_plan_header` gave no version for ``plan`` (for warnings and errors)."""
    version = serialization_version(plan)
    if version is None:
        return f"no plan magic {MAGIC!r} at offset 0"
    return (f"plan header serialization version {version} (bytes 4-7); its TensorRT version is at bytes 24-27 only "
            f"in version {KNOWN_SERIALIZATION_VERSION}")


def _looks_like_onnx(data: bytes) -> bool:
    """True when ``data`` parses as an ONNX ModelProto with a graph (protobuf field 1, ir_version, first)."""
    if bytes(data[:1]) != b"\x08":
        return False
    try:
        import onnx

        return len(onnx.load_model_from_string(bytes(data)).graph.node) > 0
    except Exception:  # not ONNX, or onnx missing: let TensorRT judge
        return False


def check_plan_version(header: PlanHeader, runtime_version: Sequence[int], version_compatible: Optional[bool],
                       exclude_lean_runtime: bool = False, lean_runtime: bool = False) -> None:
    """Refuses a plan the runtime cannot load, before touching the GPU.

    The rules (docs/tensorrt.md, "Which runtime loads which plan"):

    * a plan that is not version-compatible loads only in the exact version that built it,
      and never in the lean runtime module ``tensorrt_lean`` (which runs version-compatible
      plans only; NVIDIA/TensorRT#4790: "Unexpected call to stub loadRunner");
    * a version-compatible plan loads in the TensorRT release that built it or a later one
      (compared as major.minor.patch), within its major version or across the majors NVIDIA
      supports (:data:`CROSS_MAJOR_VERSION_COMPATIBLE`: 10 -> 11, 8 -> 10);
    * a version-compatible plan built ``exclude_lean_runtime`` has no runtime of its own:
      TensorRT runs it only with a lean runtime of the very version that built it
      (``Runtime.load_runtime(path)``, which this project does not use), so it loads only
      in that exact version here;
    * no other plan crosses a major version.

    Args:
        header: From :func:`read_plan_header`.
        runtime_version: The loaded TensorRT version (major, minor, patch, build).
        version_compatible: Whether the plan was built version-compatible (from its
            sidecar); None when unknown, then only the major versions are checked (a pair
            NVIDIA supports for version-compatible plans passes) and TensorRT judges the rest.
        exclude_lean_runtime: The plan was built with ``EXCLUDE_LEAN_RUNTIME`` (from its
            sidecar). Default False.
        lean_runtime: The runtime is the lean module ``tensorrt_lean``. Default False.

    Raises:
        EngineError: naming both versions and the fix.
    """
    have = ".".join(str(v) for v in runtime_version)
    plan = (header.major, header.minor, header.patch)
    runtime = tuple(int(v) for v in runtime_version[:3])
    fix = (f"Rebuild the plan with this TensorRT ({have}) on this GPU type, e.g. with --engine_cache or "
           f"`python -m model_tools.build` inside the image built from Dockerfile")
    if version_compatible is False and lean_runtime:
        raise EngineError(f"The plan was built without --version_compatible, and this runtime is the lean runtime "
                          f"(tensorrt_lean {have}), which runs version-compatible plans only. Rebuild the plan with "
                          f"--version_compatible, or install the full TensorRT (the image built from Dockerfile)")
    if version_compatible is False and plan != runtime:
        raise EngineError(f"The plan was built by TensorRT {header.version} without --version_compatible, "
                          f"but this runtime is TensorRT {have}; such plans load only in the exact version "
                          f"that built them. {fix}")
    if version_compatible and plan > runtime:
        raise EngineError(f"The plan was built --version_compatible by TensorRT {header.version}, newer than this "
                          f"runtime (TensorRT {have}); version-compatible plans load only in the same or a later "
                          f"release. Upgrade the runtime, or rebuild the plan with TensorRT {have} or older")
    if header.major != runtime[0] and (header.major, runtime[0]) not in CROSS_MAJOR_VERSION_COMPATIBLE:
        raise EngineError(f"The plan was built by TensorRT {header.version}, but this runtime is TensorRT {have}; "
                          f"across major versions NVIDIA supports only version-compatible plans of TensorRT 10 in 11 "
                          f"and of 8 in 10. {fix}")
    if version_compatible and exclude_lean_runtime and plan != runtime:
        raise EngineError(f"The plan was built --version_compatible --exclude_lean_runtime by TensorRT "
                          f"{header.version}, and this runtime is TensorRT {have}: such a plan carries no runtime "
                          f"of its own and runs only with a lean runtime of the version that built it. Rebuild it "
                          f"without --exclude_lean_runtime (it then runs in later releases too), or run it with "
                          f"TensorRT {header.major}.{header.minor}.{header.patch}")


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
            raise EngineError(f"{where} is not a plan sidecar written by `python -m model_tools.build`: "
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
            raise EngineError(f"No sidecar {path} beside the plan {plan_path}. Note: `python -m model_tools.build` "
                              f"writes it; rebuild the plan with it, or copy the .json next to the plan")
        return None
    try:
        data = json.loads(storage.read_bytes(path).decode("utf-8"))
    except ValueError as e:
        raise EngineError(f"Sidecar {path} is not valid JSON: {e}") from e
    return PlanInfo.from_json(data, where=path)
