"""``pipelines.classify_images`` with an engine that returns zeros: the pipeline's own ceiling.

    python -m benchmarks.run_timed RESULT.json benchmarks.noop_job [classify_images flags ...]

Everything but the model runs as in a real job (listing, reading, pre-screen, decoding on the
GPU or CPU, batching, top-k, writing), so ``ours / no-op`` says how much of the pipeline's time the
engine costs. Used by ``benchmarks.gpu``; never by a real job.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np

from engines.base import Engine, Feed, Outputs, TensorSpec, array_info
from pipelines import classify_images


class NoopEngine(Engine):
    """Takes uint8 (N, H, W, 3) images anywhere (host or GPU) and returns zero logits at once."""

    kind = "noop"

    def __init__(self, classes: int = 1000):
        self._inputs = {"images": TensorSpec("images", np.uint8, (-1, -1, -1, 3))}
        self._outputs = {"logits": TensorSpec("logits", np.float32, (-1, classes))}

    @property
    def input_specs(self) -> Dict[str, TensorSpec]:
        return dict(self._inputs)

    @property
    def output_specs(self) -> Dict[str, TensorSpec]:
        return dict(self._outputs)

    def infer(self, feed: Feed, outputs: Optional[Sequence[str]] = None) -> Outputs:
        rows = array_info(feed["images"]).shape[0]
        return {"logits": np.zeros((rows, self._outputs["logits"].shape[1]), np.float32)}


@dataclasses.dataclass(frozen=True)
class NoopLoader:
    def __call__(self) -> NoopEngine:
        return NoopEngine()


def run(argv):
    real = classify_images._engine_loader

    def noop_loader(options):
        _, batch, info, labels = real(options)
        return NoopLoader(), batch, {**info, "engine": "noop"}, labels

    classify_images._engine_loader = noop_loader
    try:
        return classify_images.run(argv)
    finally:
        classify_images._engine_loader = real
