"""Shape logic of a dynamic-batch engine: profile choice, batch splitting, refusals.

Pure Python on shapes read from an engine, so every rule here is tested without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Sequence, Tuple

from engines.base import EngineError

Shape = Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorRange:
    """The (min, opt, max) shapes one optimisation profile allows for one input."""

    min: Shape
    opt: Shape
    max: Shape

    def __post_init__(self):
        for field in ("min", "opt", "max"):
            object.__setattr__(self, field, tuple(int(d) for d in getattr(self, field)))
        if not len(self.min) == len(self.opt) == len(self.max):
            raise EngineError(f"profile shapes differ in rank: {self.min}, {self.opt}, {self.max}")

    def covers(self, shape: Shape) -> bool:
        return len(shape) == len(self.min) and all(lo <= d <= hi for d, lo, hi in zip(shape, self.min, self.max))

    def describe(self) -> str:
        return f"min {self.min} opt {self.opt} max {self.max}"


#: For each optimisation profile, the range of every input: ``profiles[k][name]``.
ProfileRanges = Sequence[Mapping[str, TensorRange]]


def batch_limits(profile: Mapping[str, TensorRange]) -> Tuple[int, int, int]:
    """(min, opt, max) batch of one profile: the tightest over its inputs' dimension 0."""
    if not profile:
        raise EngineError("the engine has no inputs in its optimization profile")
    lo = max(r.min[0] if r.min else 1 for r in profile.values())
    hi = min(r.max[0] if r.max else 1 for r in profile.values())
    opt = min(max(r.opt[0] if r.opt else 1 for r in profile.values()), hi)
    return lo, opt, hi


def describe_profiles(profiles: ProfileRanges, name: str) -> str:
    return "; ".join(f"profile {k}: {p[name].describe()}" for k, p in enumerate(profiles) if name in p)


def select_profile(profiles: ProfileRanges, shapes: Mapping[str, Shape]) -> int:
    """The profile to run ``shapes`` with: the smallest (by max batch) that covers every input.

    Raises:
        EngineError: no profile covers the shapes; names the tensor, its shape and every
            profile's range.
    """
    covering = []
    for k, profile in enumerate(profiles):
        if all(name in profile and profile[name].covers(tuple(shape)) for name, shape in shapes.items()):
            covering.append((batch_limits(profile)[2], k))
    if covering:
        return min(covering)[1]
    # Name the first input no profile covers on its own; else the mix of inputs is the problem.
    for name, shape in shapes.items():
        if not any(name in p and p[name].covers(tuple(shape)) for p in profiles):
            break
    else:
        name, shape = next(iter(shapes.items()))
    raise EngineError(
        f"Input tensor: {name} | shape {tuple(shape)} is outside every optimization profile of the engine "
        f"({describe_profiles(profiles, name)}). Note: feed batches within a profile, or rebuild the engine "
        f"with a profile covering batch {tuple(shape)[0] if shape else '?'} "
        f"(python -m engines.build --profile MIN,OPT,MAX)")


def split_points(batch: int, profiles: ProfileRanges) -> List[Tuple[int, int]]:
    """Cuts a batch into [start, stop) chunks that each fit a profile's batch range.

    Batches up to the largest profile max are one chunk. Larger ones are cut into chunks
    of that max; if the remainder is below every profile's min, the last two chunks
    share the rest evenly. Whether each chunk fits is checked by :func:`select_profile`.
    """
    if batch <= 0:
        return []
    largest = max(batch_limits(p)[2] for p in profiles)
    if batch <= largest:
        return [(0, batch)]
    cuts = [(start, min(start + largest, batch)) for start in range(0, batch, largest)]
    rest = cuts[-1][1] - cuts[-1][0]
    smallest_min = min(batch_limits(p)[0] for p in profiles)
    if rest < smallest_min and len(cuts) > 1:
        start = cuts[-2][0]
        half = (batch - start + 1) // 2
        cuts[-2:] = [(start, start + half), (start + half, batch)]
    return cuts


def max_shapes(profiles: ProfileRanges) -> Dict[str, Shape]:
    """Per input, the element-wise largest shape over all profiles (to size buffers once)."""
    out: Dict[str, Shape] = {}
    for profile in profiles:
        for name, rng in profile.items():
            prev = out.get(name)
            out[name] = rng.max if prev is None else tuple(max(a, b) for a, b in zip(prev, rng.max))
    return out
