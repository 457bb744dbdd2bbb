"""``pipelines.classify_images`` with an engine that returns zeros: the pipeline's own ceiling.

    python -m benchmarks.run_timed RESULT.json benchmarks.noop_job [classify_images flags ...]

Everything but the model runs as in a real job (listing, reading, pre-screen, decoding on the
GPU or CPU, batching, top-k, writing), so ``ours / no-op`` says how much of the pipeline's time the
engine costs. Used by ``benchmarks.gpu``; never by a real job.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from engines.base import Engine, EngineRecipe, Feed, Outputs, TensorSpec, array_info
from pipelines import classify_images, engine_registry


class NoopEngine(Engine):
    """Takes uint8 (N, H, W, 3) images anywhere (host or GPU) and returns zero logits at once."""

    kind = "noop"

    def __init__(self, classes: int = 1000):
        self._inputs = {"images": TensorSpec("images", np.uint8, (-1, -1, -1, 3))}
        self._outputs = {"logits": TensorSpec("logits", np.float32, (-1, classes))}

    def infer(self, feed: Feed, outputs: Optional[Sequence[str]] = None) -> Outputs:
        rows = array_info(feed["images"]).shape[0]
        return {"logits": np.zeros((rows, self._outputs["logits"].shape[1]), np.float32)}


@dataclasses.dataclass(frozen=True)
class NoopLoader:
    def __call__(self) -> NoopEngine:
        return NoopEngine()


def cli_on_gpu(options) -> bool:
    """As the ONNX Runtime engine it stands in for: on a GPU when --providers names one."""
    from engines.onnxruntime_engine import cli_on_gpu as onnxruntime_on_gpu

    return onnxruntime_on_gpu(options)


def cli_recipe(options) -> EngineRecipe:
    """The ONNX Runtime recipe's batch size and labels, with the no-op engine as the loader."""
    from engines.onnxruntime_engine import cli_recipe as onnxruntime_recipe

    real = onnxruntime_recipe(options)
    return dataclasses.replace(real, loader=NoopLoader(), info={**real.info, "engine": "noop"})


def run(argv):
    """``classify_images.run`` with ``--engine noop``: one registry entry, as a third engine would be."""
    engine_registry.ENGINES.setdefault("noop", __name__)
    argv = list(argv)
    if "--engine" in argv:
        argv[argv.index("--engine") + 1] = "noop"
    else:
        argv += ["--engine", "noop"]
    options_model = [] if "--model" in argv else ["--model", classify_images.DEFAULT_MODEL]
    return classify_images.run(argv + options_model)
