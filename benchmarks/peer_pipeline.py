"""The peer: the image classifier a Beam user writes from Beam's docs and examples.

    python -m benchmarks.peer_pipeline --input 'images/*.jpg' --output out/predictions.txt \\
        --model_path models/efficientnet_lite0_float32_nchw.onnx [Beam options ...]

Written the way Beam's RunInference documentation and its example pipelines
(``apache_beam/examples/inference/pytorch_image_classification.py``, the ONNX
notebook) do it, so that ``benchmarks.throughput`` measures this project against
what a user would otherwise run:

``fileio.MatchFiles`` -> ``fileio.ReadMatches`` -> Pillow decode -> resize the
shorter side to 256, centre-crop 224, float32 ImageNet normalisation in numpy,
HWC -> CHW -> ``RunInference`` with Beam's own ``OnnxModelHandlerNumpy`` (CPU
provider, RunInference's default batching) on the float32 NCHW export of the
same EfficientNet-Lite0 weights -> top-1 class id -> ``WriteToText``.

Nothing here is tuned, and nothing is slowed down: no JPEG draft mode, no uint8
transport, no thread or batch settings beyond the defaults.
"""

from __future__ import annotations

import argparse
import io
import logging
from typing import Iterable, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.ml.inference.onnx_inference import OnnxModelHandlerNumpy
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
RESIZE = 256
CROP = 224


def read_image(readable_file: fileio.ReadableFile) -> Tuple[str, Image.Image]:
    """A matched file -> (its path, the decoded RGB image)."""
    path = readable_file.metadata.path
    image = Image.open(io.BytesIO(readable_file.read())).convert("RGB")
    return path, image


def preprocess_image(image: Image.Image) -> np.ndarray:
    """Resize the shorter side to 256, centre-crop 224, normalise: float32 (3, 224, 224)."""
    width, height = image.size
    scale = RESIZE / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    left = (image.width - CROP) // 2
    top = (image.height - CROP) // 2
    image = image.crop((left, top, left + CROP, top + CROP))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # HWC -> CHW, as the model expects


class PostProcessor(beam.DoFn):
    """(path, PredictionResult) -> ``"path,class_id"`` with the top-1 class."""

    def process(self, element: Tuple[str, PredictionResult]) -> Iterable[str]:
        filename, prediction_result = element
        prediction = int(np.argmax(prediction_result.inference, axis=-1))
        yield f"{filename},{prediction}"


def parse_known_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="Glob of the images to classify.")
    parser.add_argument("--output", required=True, help="Path of the text file with 'path,class_id' lines.")
    parser.add_argument("--model_path", required=True, help="ONNX model taking float32 NCHW normalised images.")
    return parser.parse_known_args(argv)


def run(argv: Optional[list] = None, save_main_session: bool = True):
    """Builds and runs the pipeline; returns the finished PipelineResult.

    Args:
        argv: Command-line arguments; unknown ones are Beam pipeline options.
        save_main_session: Pickle the main session for the workers, as Beam's examples do. Default True.
    """
    known_args, pipeline_args = parse_known_args(argv)
    pipeline_options = PipelineOptions(pipeline_args)
    pipeline_options.view_as(SetupOptions).save_main_session = save_main_session

    model_handler = KeyedModelHandler(
        OnnxModelHandlerNumpy(model_uri=known_args.model_path, providers=["CPUExecutionProvider"]))

    pipeline = beam.Pipeline(options=pipeline_options)
    filename_value_pair = (
        pipeline
        | "MatchFiles" >> fileio.MatchFiles(known_args.input)
        | "ReadMatches" >> fileio.ReadMatches()
        | "ReadImage" >> beam.Map(read_image)
        | "PreprocessImages" >> beam.MapTuple(lambda file_name, image: (file_name, preprocess_image(image))))
    predictions = (
        filename_value_pair
        | "RunInference" >> RunInference(model_handler)
        | "PostProcessOutputs" >> beam.ParDo(PostProcessor()))
    predictions | "WriteOutput" >> beam.io.WriteToText(
        known_args.output, shard_name_template="", append_trailing_newlines=True)
    result = pipeline.run()
    result.wait_until_finish()
    return result


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
