"""Shape logic of a dynamic-batch engine: profile choice, batch splitting, refusals.

Pure Python on shapes read from an engine, so every rule here is tested without a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import List, Mapping, Sequence, Tuple

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
        f"(python -m model_tools.build --profile MIN,OPT,MAX)")


def check_batch_coverage(ranges: Sequence[Tuple[int, int]], labels: Sequence[str]) -> None:
    """Refuses profile batch ranges that leave a gap between the smallest min and the largest max.

    Splitting and padding (:func:`split_points`) rely on every batch size from the
    smallest profile min to the largest profile max being accepted by some profile.

    Args:
        ranges: (min, max) batch of each profile.
        labels: How to name each profile in the message.

    Raises:
        EngineError: a batch size between two profiles is accepted by none; names both.
    """
    order = sorted(range(len(ranges)), key=lambda k: ranges[k])
    reach, reach_k = None, None
    for k in order:
        lo, hi = ranges[k]
        if reach is not None and lo > reach + 1:
            raise EngineError(
                f"The optimization profiles leave a gap: {labels[reach_k]} ends at batch {reach} and {labels[k]} "
                f"starts at {lo}, so batches {reach + 1}..{lo - 1} fit no profile. Note: make the profiles' batch "
                f"ranges meet, e.g. --profile {ranges[reach_k][0]},{reach},{reach} --profile {reach + 1},{lo},{hi}")
        if reach is None or hi > reach:
            reach, reach_k = hi, k


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of a batch, run as a batch of ``size`` (the last row repeated to fill)."""

    start: int
    stop: int
    size: int

    @property
    def pad(self) -> int:
        """How many copies of the last row are appended to reach ``size``."""
        return self.size - (self.stop - self.start)


def split_points(batch: int, profiles: ProfileRanges) -> List[Chunk]:
    """Cuts a batch into chunks that each run within a profile's batch range.

    Assumes the profiles' batch ranges leave no gap (:func:`check_batch_coverage`), so every
    size from the smallest min to the largest max fits some profile. Batches up to the
    largest max are one chunk; larger ones are cut into chunks of that max. A remainder
    below the smallest min is shared evenly with the chunk before it when both halves
    reach that min, else it is padded up to the min (the caller repeats the last example
    and drops the extra outputs). A batch below the smallest min is padded the same way.
    """
    if batch <= 0:
        return []
    limits = [batch_limits(p) for p in profiles]
    smallest_min = min(lo for lo, _, _ in limits)
    largest = max(hi for _, _, hi in limits)
    cuts = [(start, min(start + largest, batch)) for start in range(0, batch, largest)]
    rest = cuts[-1][1] - cuts[-1][0]
    if rest < smallest_min and len(cuts) > 1 and largest + rest >= 2 * smallest_min:
        start = cuts[-2][0]
        half = (batch - start + 1) // 2
        cuts[-2:] = [(start, start + half), (start + half, batch)]
    return [Chunk(a, b, max(b - a, smallest_min)) for a, b in cuts]
