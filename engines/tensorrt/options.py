"""Typed, validated build settings: optimisation profiles and :class:`BuildOptions`.

Pure Python (no TensorRT): the Beam handler reads batch sizes from these on a
laptop, and the engine cache keys plans by :meth:`BuildOptions.cache_key`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Optional, Tuple

from engines.base import EngineError
from engines.flags import PRECISIONS  # one list for every engine's --precision
from engines.tensorrt.shapes import check_batch_coverage

__all__ = ["PRECISIONS", "HARDWARE_COMPATIBILITY", "BuildOptions", "Profile"]

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")

#: Bump when the meaning of a build option changes, so old cached plans are not reused.
#: 2: profiles are stored once, not once per execution context (contexts share them at run time);
#: ``contexts`` is gone.
_KEY_SCHEMA = 2


@dataclasses.dataclass(frozen=True)
class Profile:
    """One optimisation profile's batch range, applied to every dynamic-batch input.

    Attributes:
        min: Smallest batch the profile accepts (>= 1).
        opt: Batch TensorRT tunes kernels for (min <= opt <= max).
        max: Largest batch the profile accepts; device buffers are sized for it.
    """

    min: int
    opt: int
    max: int

    def __post_init__(self):
        for field in ("min", "opt", "max"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise EngineError(f"Profile {field} must be an int, got {value!r}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise EngineError(f"Profile needs 1 <= min <= opt <= max, got min={self.min} opt={self.opt} "
                              f"max={self.max}")

    @classmethod
    def parse(cls, text: str) -> "Profile":
        """Parses "MIN,OPT,MAX" (the ``--profile`` flag)."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise EngineError(f"A profile is MIN,OPT,MAX batch sizes, e.g. 1,64,256; got {text!r}")
        return cls(*(int(p) for p in parts))

    def covers(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def describe(self) -> str:
        return f"[{self.min}..{self.max}] opt {self.opt}"

    def to_json(self) -> Dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def _to_profile(value: Any) -> Profile:
    if isinstance(value, Profile):
        return value
    if isinstance(value, str):
        return Profile.parse(value)
    if isinstance(value, dict):
        return Profile(int(value["min"]), int(value["opt"]), int(value["max"]))
    if isinstance(value, (tuple, list)) and len(value) == 3:
        return Profile(*(int(v) for v in value))
    raise EngineError(f"Cannot read a profile from {value!r}; use Profile(min, opt, max) or 'MIN,OPT,MAX'")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How an ONNX model becomes a TensorRT plan.

    Attributes:
        profiles: Optimisation profiles (batch ranges). Default one profile (1, 64, 256).
            Each applies to every input whose batch dimension is dynamic; other
            dimensions come from the ONNX model. Their batch ranges must leave no gap
            (every batch from the smallest min to the largest max fits some profile), so
            that any batch can be split into chunks the engine accepts.
        precision: "fp32" or "fp16". Default "fp32". On TensorRT 10.x fp16 sets
            ``BuilderFlag.FP16``; on 11.x (strongly typed networks, no precision flags)
            the ONNX model is converted to fp16 first, keeping its input/output types.
        workspace_gib: Builder workspace limit in GiB, or None for TensorRT's default
            (the device's memory). Default None.
        opt_level: Builder optimisation level 0-5 (higher builds slower, may run faster).
            Default 3, TensorRT's own default.
        timing_cache: Path (local or gs://) of a timing cache to load before and save
            after building, or None. Default None. Each GPU type and TensorRT version uses its
            own file, ``PATH.<gpu>-sm<cc>-trt<version>`` (``engines.tensorrt.cache.timing_cache_path``).
            Not part of :meth:`cache_key`: it changes build time, not what a plan computes.
        version_compatible: Build a plan later TensorRT versions of the same major (and
            the lean runtime) can run. Default False.
        exclude_lean_runtime: With ``version_compatible``, leave the lean runtime out
            of the plan (smaller; the runner must then have a matching lean runtime).
            Default False.
        hardware_compatibility: "none", "ampere_plus" (runs on any Ampere or newer GPU,
            slower) or "same_compute_capability" (TensorRT 10.9+). Default "none".

    Each profile is stored once: any number of execution contexts may use it at the same
    time (TensorRT 10.x/11.x), so how many contexts run a plan is the runtime's choice
    (``TensorRTEngine(num_contexts=...)``), not part of the plan.
    """

    profiles: Tuple[Profile, ...] = (Profile(1, 64, 256),)
    precision: str = "fp32"
    workspace_gib: Optional[float] = None
    opt_level: int = 3
    timing_cache: Optional[str] = None
    version_compatible: bool = False
    exclude_lean_runtime: bool = False
    hardware_compatibility: str = "none"

    def __post_init__(self):
        profiles = self.profiles
        if isinstance(profiles, (Profile, str, dict)):
            profiles = (profiles,)
        object.__setattr__(self, "profiles", tuple(_to_profile(p) for p in profiles))
        if not self.profiles:
            raise EngineError("BuildOptions needs at least one profile, e.g. Profile(1, 64, 256)")
        check_batch_coverage([(p.min, p.max) for p in self.profiles],
                             [f"profile {k} {p.describe()}" for k, p in enumerate(self.profiles)])
        if self.precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise EngineError(f"workspace_gib must be > 0 (or None for TensorRT's default), "
                              f"got {self.workspace_gib}")
        if isinstance(self.opt_level, bool) or not isinstance(self.opt_level, int) \
                or not 0 <= self.opt_level <= 5:
            raise EngineError(f"opt_level must be an int in 0..5, got {self.opt_level!r}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise EngineError(f"hardware_compatibility must be one of {HARDWARE_COMPATIBILITY}, "
                              f"got {self.hardware_compatibility!r}")
        if self.exclude_lean_runtime and not self.version_compatible:
            raise EngineError("exclude_lean_runtime needs version_compatible=True (it only applies to "
                              "version-compatible plans)")

    def key_fields(self) -> Dict[str, Any]:
        """The settings that change what plan is built (everything but the timing cache)."""
        return {
            "schema": _KEY_SCHEMA,
            "profiles": [p.to_json() for p in self.profiles],
            "precision": self.precision,
            "workspace_gib": self.workspace_gib,
            "opt_level": self.opt_level,
            "version_compatible": self.version_compatible,
            "exclude_lean_runtime": self.exclude_lean_runtime,
            "hardware_compatibility": self.hardware_compatibility,
        }

    def cache_key(self) -> str:
        """A stable 16-hex-digit digest of :meth:`key_fields` (same in every process and run)."""
        text = json.dumps(self.key_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def to_json(self) -> Dict[str, Any]:
        fields = self.key_fields()
        fields.pop("schema")
        fields["timing_cache"] = self.timing_cache
        return fields

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "BuildOptions":
        # Unknown keys are ignored: sidecars of key schema 1 still carry "contexts".
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

