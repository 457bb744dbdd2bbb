"""GPU memory one engine copy and its decoder hold, step by step: ``python -m benchmarks.gpu_memory``.

Every SDK process of a GPU worker loads one engine (ONNX Runtime CUDA) and one DALI decoder, so
this figure decides how many processes fit on a GPU (eight on one 80 GB H100 ran it out of
memory). Run it alone on a GPU: it reads the device-wide used memory (``cudaMemGetInfo``) after
each step and prints a table, with ONNX Runtime's CUDA arena at its default growth and at
``kSameAsRequested``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks.corpus import ensure_corpus
from benchmarks.gpu import DEFAULT_MODEL, decode_inputs


def used_mib() -> float:
    from cuda.bindings import runtime

    err, free, total = runtime.cudaMemGetInfo()
    return round((total - free) / 2 ** 20, 1)


def _session(model: str, extend: Optional[str]):
    import onnxruntime as ort

    options = {"device_id": "0"}
    if extend:
        options["arena_extend_strategy"] = extend
    return ort.InferenceSession(model, providers=["CUDAExecutionProvider"], provider_options=[options])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_memory", description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1024, help="Corpus JPEGs decoded. Default: 1024.")
    parser.add_argument("--corpus_dir", default="benchmark_output/gpu/corpus")
    parser.add_argument("--extend", default="", help="arena_extend_strategy for the engine step; '' = default.")
    parser.add_argument("--precision", default=None, choices=("fp32", "fp16"),
                        help="Load the model as the job does (engines.onnxruntime_engine.OnnxRuntimeLoader: its "
                             "arena settings, --precision); default: a bare session with --extend.")
    parser.add_argument("--conv_workspace", default="max", choices=("max", "minimal"),
                        help="With --precision: cuDNN convolution workspace, ONNX Runtime's default (max) or "
                             "cudnn_conv_use_max_workspace=0 (minimal). Default: max.")
    args = parser.parse_args(argv)
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    steps: List[Dict[str, object]] = [{"step": "CUDA context", "used_mib": None}]
    import cupy

    cupy.zeros(1)  # a context, as any process that uses the GPU has
    steps[0]["used_mib"] = used_mib()
    if args.precision:
        from engines import onnxruntime_engine

        if args.conv_workspace == "minimal":
            plain = onnxruntime_engine._gpu_options
            onnxruntime_engine._gpu_options = lambda provider, device: {
                **plain(provider, device), **({"cudnn_conv_use_max_workspace": "0"}
                                              if provider == "CUDAExecutionProvider" else {})}
        engine = onnxruntime_engine.OnnxRuntimeLoader(args.model, ("cuda",), precision=args.precision)()
        steps.append({"step": f"the job's engine ({args.precision}, conv workspace {args.conv_workspace})",
                      "used_mib": used_mib()})
        name = engine.input_names()[0]

        def run(batch):
            engine.infer({name: batch}, ["logits"])
    else:
        session = _session(args.model, args.extend or None)
        steps.append({"step": f"ONNX Runtime session (arena {args.extend or 'default'})", "used_mib": used_mib()})
        name = session.get_inputs()[0].name

        def run(batch):
            session.run(["logits"], {name: batch})
    batch = np.zeros((args.batch_size, 224, 224, 3), np.uint8)
    for _ in range(3):
        run(batch)
    steps.append({"step": f"after 3 inferences at batch {args.batch_size}", "used_mib": used_mib()})
    corpus = ensure_corpus(args.corpus_dir, args.images)
    blobs = [open(p, "rb").read() for p in corpus.paths]
    decoder = DaliDecoder(DaliDecoderOptions(max_batch=args.batch_size, device="gpu",
                                             threads=min(8, os.cpu_count() or 1)))
    steps.append({"step": "DALI decoder built", "used_mib": used_mib()})
    for _ in decoder.decode(decode_inputs(blobs, args.batch_size)):
        pass
    steps.append({"step": f"after decoding {len(blobs)} JPEGs", "used_mib": used_mib()})
    base = steps[0]["used_mib"]
    print("| step | GPU memory used (MiB) | over the bare context |")
    print("|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['used_mib']:,.0f} | {s['used_mib'] - base:,.0f} |")
    print(json.dumps(steps))
    decoder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
