"""Export EfficientNet-Lite0 as docs/own-model.md shows users: plain ``torch.onnx.export``, today's defaults.

    python -m tests.torch_export --output models/efficientnet_lite0_torch_export.onnx    (in .venv-export)

Since torch 2.9 the call below runs the dynamo exporter (it needs ``onnxscript``): opset 18 or
later, ``ReduceMean`` for global pooling, padding folded into the convolutions, and the weights
in ``<output>.data`` beside the model. The tests hold the adapter and the validation to such a
file, not only to the project's own TorchScript export (``make test`` writes it; no network).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="The .onnx file to write (weights go beside it).")
    args = parser.parse_args(argv)
    import torch

    from model_tools.export_efficientnet import build_module

    model = build_module("float32_nchw")  # a pretrained nn.Module in eval(), as torchvision/timm give
    example = torch.randn(1, 3, 224, 224)
    # What users write, unchanged (the torch docs' and most tutorials' call).
    torch.onnx.export(model, (example,), args.output, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
