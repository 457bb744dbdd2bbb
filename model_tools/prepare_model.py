"""Write a user's ONNX model with the pipeline's input conversion in its graph, for offline builds.

    python -m model_tools.prepare_model model.onnx model_uint8.onnx --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    python -m model_tools.prepare_model detector_head.onnx out.onnx --mean ... --std ... --channel_order bgr
    python -m model_tools.prepare_model tagger.onnx out.onnx --mean ... --std ... --activation sigmoid

The written model takes uint8 RGB images ``(N, H, W, 3)`` with the model's own H and W (the
pipeline's input, README "Only uint8 travels") and does the float conversion, normalisation,
channel swap and layout change itself (``engines.model_adapter.wrap``): the same model a job
builds in memory when it is given the original and the same flags. Build a TensorRT plan from it
(``--onnx_path``) and check it against the original with ``model_tools.validate`` and the same flags.

The activation the pipeline applies to the ranked output (``--activation``, resolved from the
graph for ``auto``) is written into the model's metadata (``output_activation``), so a job, or a
plan built from the model, reads the scores the same way without the flag. Exit status 0 when
written, 2 on a usage or model error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from engines import storage
from engines.base import EngineError, UsageError, import_optional
from engines.model_adapter import (ACTIVATIONS, CHANNEL_ORDERS, IMAGENET_FLAGS, Preprocessing, describe_input,
                                   load_model, record_activation, resolve_activation, wrap)
from engines.onnx_summary import ONNX_HINT

#: protobuf cannot serialise a message of 2 GiB or more; bigger models keep weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 1


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model_tools.prepare_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="The ONNX model as exported (local path or gs://).")
    parser.add_argument("output", help="Where to write the prepared model (local path or gs://).")
    parser.add_argument("--mean", default=None,
                        help=f"Per-colour mean R,G,B on the 0-1 scale the model was trained with "
                             f"(ImageNet: {IMAGENET_FLAGS}). Needed for models that take float input.")
    parser.add_argument("--std", default=None, help="Per-colour standard deviation R,G,B, with --mean.")
    parser.add_argument("--channel_order", default="rgb", choices=CHANNEL_ORDERS,
                        help="The channel order the model was trained on. Default rgb.")
    parser.add_argument("--activation", default="auto", choices=ACTIVATIONS,
                        help="How the pipeline turns the output into scores: softmax (single-label logits), "
                             "sigmoid (multi-label logits), none (already scores, or embeddings). Default auto: "
                             "none when the graph ends in Softmax or Sigmoid, else softmax.")
    parser.add_argument("--output_name", default=None,
                        help="The output the pipeline ranks. Default: 'logits' if the model has it, else its "
                             "first output.")
    return parser.parse_args(argv)


def save(model, path: str) -> None:
    """Writes the model checked; over 2 GiB, its weights go to ``<path>.data`` beside it (local paths).

    Raises:
        EngineError: the model fails ONNX's checker, or cannot be written.
        UsageError: a model over 2 GiB for a gs:// path.
    """
    onnx = import_optional("onnx", ONNX_HINT)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights < _PROTOBUF_LIMIT - 64 * 2**20:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise EngineError(f"The prepared model fails ONNX's checker: {e}") from e
        storage.write_bytes(path, model.SerializeToString())
        return
    if storage.is_url(path):
        raise UsageError(f"The prepared model holds {weights / 2**30:.1f} GiB of weights, more than one ONNX file "
                         f"holds; write it to a local path (weights go to a .data file beside it) and copy both")
    onnx.save_model(model, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
    onnx.checker.check_model(path)


def default_output(model, name: Optional[str]) -> str:
    """The output the pipeline ranks: ``name``, else "logits", else the model's first output."""
    outputs = [v.name for v in model.graph.output]
    if name:
        return name  # resolve_activation names the outputs when it is not one of them
    return "logits" if "logits" in outputs else outputs[0]


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        preprocessing = Preprocessing.from_flags(args.mean, args.std, args.channel_order)
        model = load_model(args.model)
        source = os.path.basename(args.model)
        original = describe_input(model, source)
        prepared = wrap(model, preprocessing, source)
        output = default_output(prepared, args.output_name)
        activation = resolve_activation(prepared, output, args.activation, source)
        record_activation(prepared, output, activation)
        save(prepared, args.output)
    except (UsageError, EngineError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = describe_input(prepared, args.output)
    change = ("input unchanged" if spec == original else
              f"was {original.describe()}; {preprocessing.flags() or 'the cast'} now in the graph")
    print(f"wrote {args.output}: input {spec.describe()} RGB ({change}); output {output!r}: the pipeline applies "
          f"{activation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
