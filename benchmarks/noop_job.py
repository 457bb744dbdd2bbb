"""``pipelines.classify_images`` with an engine that returns zeros: the pipeline's own ceiling.

    python -m benchmarks.run_timed RESULT.json benchmarks.noop_job [classify_images flags ...]

Everything but the model runs as in a real job (listing, reading, pre-screen, decoding on the
GPU or CPU, batching, top-k, writing), so ``ours / no-op`` says how much of the pipeline's time the
engine costs. Used by ``benchmarks.gpu``; never by a real job.

``NOOP_ENGINE_US_PER_IMAGE=N`` makes each call take N microseconds per image, sleeping without the GIL
as a GPU engine's call waits for its stream: a stand-in for a GPU engine on a machine without one, to
see whether the engine's time overlaps the rest of the pipeline's (``--no_score_ahead`` against the default).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Optional, Sequence

import numpy as np

from engines.base import Engine, EngineRecipe, Feed, Outputs, TensorSpec, array_info
# The ONNX Runtime engine it stands in for answers the registry's other questions (its flags are
# added by the registry already, as every engine's are).
from engines.onnxruntime_engine import DEFAULT_MODEL, cli_check, cli_on_gpu, cli_worker_paths  # noqa: F401
from pipelines import classify_images, engine_registry


class NoopEngine(Engine):
    """Takes uint8 (N, H, W, 3) images anywhere (host or GPU) and returns zero logits at once."""

    kind = "noop"

    def __init__(self, classes: int = 1000, seconds_per_image: float = 0.0):
        self._inputs = {"images": TensorSpec("images", np.uint8, (-1, -1, -1, 3))}
        self._outputs = {"logits": TensorSpec("logits", np.float32, (-1, classes))}
        self._seconds_per_image = seconds_per_image

    def infer(self, feed: Feed, outputs: Optional[Sequence[str]] = None) -> Outputs:
        rows = array_info(feed["images"]).shape[0]
        if self._seconds_per_image:
            time.sleep(rows * self._seconds_per_image)
        return {"logits": np.zeros((rows, self._outputs["logits"].shape[1]), np.float32)}


@dataclasses.dataclass(frozen=True)
class NoopLoader:
    def __call__(self) -> NoopEngine:
        return NoopEngine(seconds_per_image=float(os.environ.get("NOOP_ENGINE_US_PER_IMAGE", "0")) / 1e6)


def cli_model_file(options) -> None:
    """No model file to check at start: the no-op engine never reads one (``pipelines/engine_registry.py``)."""
    return None


def cli_recipe(options, batch_size, preprocessing=None, sha256=None) -> EngineRecipe:
    """The ONNX Runtime recipe's batch size and labels, with the no-op engine as the loader."""
    from engines.onnxruntime_engine import cli_recipe as onnxruntime_recipe

    real = onnxruntime_recipe(options, batch_size, preprocessing, sha256)
    return dataclasses.replace(real, loader=NoopLoader(), info={**real.info, "engine": "noop"})


def run(argv):
    """``classify_images.run`` with ``--engine noop``: one registry entry, as a third engine would be."""
    engine_registry.ENGINES.setdefault("noop", __name__)
    argv = list(argv)
    if "--engine" in argv:
        argv[argv.index("--engine") + 1] = "noop"
    else:
        argv += ["--engine", "noop"]
    options_model = [] if "--model" in argv else ["--model", DEFAULT_MODEL]
    return classify_images.run(argv + options_model)
