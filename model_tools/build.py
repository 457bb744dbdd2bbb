"""Build a TensorRT engine from an ONNX model, on the GPU type it will run on.

    python -m model_tools.build --onnx model.onnx --output model.plan [--fp16] \\
        [--min_batch 1 --opt_batch 64 --max_batch 256 | --profile MIN,OPT,MAX ...] \\
        [--workspace_gib G] [--timing_cache PATH] [--opt_level N] \\
        [--version_compatible [--exclude_lean_runtime]] [--hardware_compatibility ampere_plus]

Writes ``model.plan`` and the sidecar ``model.plan.json`` (TensorRT version, GPU and
compute capability, profiles, precision, sha256 of the ONNX model, labels from the
model's metadata) that the runtime and the Beam handler read. Paths may be gs://.
Needs a GPU and the full TensorRT (the image built from Dockerfile).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from engines.base import EngineError, UsageError
from engines.tensorrt.options import HARDWARE_COMPATIBILITY, BuildOptions, Profile


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    """The build flags, shared with ``python -m model_tools.validate``."""
    parser.add_argument("--fp16", action="store_true", help="Build an fp16 engine (default fp32).")
    parser.add_argument("--min_batch", type=int, default=None, help="Profile min batch (default 1).")
    parser.add_argument("--opt_batch", type=int, default=None, help="Profile opt batch (default 64).")
    parser.add_argument("--max_batch", type=int, default=None, help="Profile max batch (default 256).")
    parser.add_argument("--profile", action="append", default=[], metavar="MIN,OPT,MAX",
                        help="An optimisation profile; repeat for several. Replaces --min/opt/max_batch.")
    parser.add_argument("--workspace_gib", type=float, default=None,
                        help="Builder workspace limit in GiB (default: TensorRT's, the GPU's memory).")
    parser.add_argument("--timing_cache", default=None,
                        help="Timing cache to reuse and update (local or gs://); speeds up rebuilds. One file per "
                             "GPU type and TensorRT version: PATH.<gpu>-sm<cc>-trt<version>.")
    parser.add_argument("--opt_level", type=int, default=3, help="Builder optimisation level 0-5 (default 3).")
    parser.add_argument("--version_compatible", action="store_true",
                        help="Plan later TensorRT versions of the same major (and tensorrt_lean) can run.")
    parser.add_argument("--exclude_lean_runtime", action="store_true",
                        help="With --version_compatible: leave the lean runtime out of the plan.")
    parser.add_argument("--hardware_compatibility", default="none", choices=HARDWARE_COMPATIBILITY,
                        help="ampere_plus: one plan for every Ampere-or-newer GPU (slower); same_compute_capability "
                             "(TensorRT 10.9+): one plan for GPUs of the build GPU's compute capability. Default none.")


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    """BuildOptions from the flags of :func:`add_build_arguments`.

    Raises:
        UsageError: --profile mixed with --min/opt/max_batch.
        EngineError: invalid values (a malformed --profile, batch sizes out of order).
    """
    single = (args.min_batch, args.opt_batch, args.max_batch)
    if args.profile:
        if any(v is not None for v in single):
            raise UsageError("Use either --profile MIN,OPT,MAX (repeatable) or --min_batch/--opt_batch/--max_batch, "
                             "not both")
        profiles = tuple(Profile.parse(p) for p in args.profile)
    else:
        lo = 1 if args.min_batch is None else args.min_batch
        hi = 256 if args.max_batch is None else args.max_batch
        opt = min(max(64, lo), hi) if args.opt_batch is None else args.opt_batch
        profiles = (Profile(lo, opt, hi),)
    return BuildOptions(profiles=profiles, precision="fp16" if args.fp16 else "fp32",
                        workspace_gib=args.workspace_gib, opt_level=args.opt_level, timing_cache=args.timing_cache,
                        version_compatible=args.version_compatible, exclude_lean_runtime=args.exclude_lean_runtime,
                        hardware_compatibility=args.hardware_compatibility)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model_tools.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", required=True, help="The ONNX model (local or gs://).")
    parser.add_argument("--output", required=True, help="Where to write the plan (local or gs://).")
    parser.add_argument("--device", type=int, default=0, help="GPU index to build on (default 0).")
    add_build_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        options = options_from_args(args)
        from engines import storage
        from engines.tensorrt.builder import build_plan
        from engines.tensorrt.plan import write_sidecar

        built = build_plan(args.onnx, options, args.device)
        storage.write_bytes(args.output, built.plan)
        sidecar = write_sidecar(args.output, built.info)
    except (UsageError, EngineError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = built.info
    print(f"wrote {args.output} ({len(built.plan)} bytes, {info.precision}, TensorRT {info.tensorrt_version}, "
          f"{info.gpu_name} compute {info.compute_capability}, profiles "
          f"{[p.describe() for p in info.profiles]}) and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
