"""How long the GPU decoder takes to build, and whether any decoder option shortens it: the first image's
critical path (the preload builds it, holding the GIL, while Beam starts the job).

    python -m benchmarks.dali_build [--device gpu|cpu] [--rounds 2] [--threads 16] [--variants default,pad0,...]

Each variant runs in a fresh process, as a job's first build does. On a GPU, CUDA's context is made first (the
engine's load makes it in the job, so the decoder's build does not pay for it), then
:class:`images.dali_decoder.DaliDecoder` is built with the job's options (batch 256) and the variant's extra
keyword arguments for ``fn.decoders.image``. Printed per variant and round: ``Pipeline.build`` alone, the whole
decoder (graph, build and the priming run) and the GPU memory in use after it.

Variants: ``default``; ``pad0`` (no device or host memory padding); ``hostpad0`` (no pinned host padding);
``hw0`` (``hw_decoder_load`` 0: no JPEG for the hardware decoder); ``threads4`` (4 CPU threads, not 16). Only
``default`` and ``threads4`` apply to ``--device cpu``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

VARIANTS: Dict[str, dict] = {
    "default": {},
    "pad0": {"device_memory_padding": 0, "host_memory_padding": 0},
    "hostpad0": {"host_memory_padding": 0},
    "hw0": {"hw_decoder_load": 0.0},
    "threads4": {"_threads": 4},
}
CPU_VARIANTS = ("default", "threads4")


def build_once(name: str, device: str, threads: int) -> dict:
    """Builds one decoder in this process and returns its timings (seconds) and GPU memory in use (MiB)."""
    extra = dict(VARIANTS[name])
    threads = extra.pop("_threads", threads)
    result = {"variant": name, "device": device}
    cuda = None
    if device == "gpu":
        from engines import cuda

        start = time.perf_counter()
        rt = cuda.cudart()
        cuda.check(rt.cudaSetDevice(0), "cudaSetDevice(0)")
        cuda.check(rt.cudaFree(0), "cudaFree(0) (makes the context)")
        result["cuda_context_s"] = time.perf_counter() - start
    start = time.perf_counter()
    import nvidia.dali as dali
    from nvidia.dali import fn

    result["import_dali_s"] = time.perf_counter() - start
    if extra:
        plain = fn.decoders.image

        def image(*args, **kwargs):
            return plain(*args, **{**kwargs, **extra})

        fn.decoders.image = image
    builds: List[float] = []
    plain_build = dali.Pipeline.build

    def timed_build(self):
        begin = time.perf_counter()
        plain_build(self)
        builds.append(time.perf_counter() - begin)

    dali.Pipeline.build = timed_build
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions

    start = time.perf_counter()
    DaliDecoder(DaliDecoderOptions(device=device, threads=threads))
    result["decoder_s"] = time.perf_counter() - start
    result["pipeline_build_s"] = builds[0]
    if cuda is not None:
        free, total = cuda.check(cuda.cudart().cudaMemGetInfo(), "cudaMemGetInfo")
        result["gpu_used_mib"] = round((total - free) / 2 ** 20)
    return result


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--rounds", type=int, default=2, help="Each variant this many times, interleaved (>= 1).")
    parser.add_argument("--timeout_s", type=float, default=300, help="Most seconds one build's process may take.")
    parser.add_argument("--threads", type=int, default=16, help="DALI CPU threads (the job's --dali_threads).")
    parser.add_argument("--variants", default=None, help="Comma-separated; default: all that apply to --device.")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: build this variant
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(build_once(args.one, args.device, args.threads)), flush=True)
        return []
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    names = args.variants.split(",") if args.variants else list(VARIANTS if args.device == "gpu" else CPU_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS or (args.device == "cpu" and n not in CPU_VARIANTS)]
    if unknown:
        raise SystemExit(f"unknown variants for --device {args.device}: {unknown}")
    rows: List[dict] = []
    for _ in range(args.rounds):
        for name in names:
            child = subprocess.run([sys.executable, "-m", "benchmarks.dali_build", "--one", name, "--device",
                                    args.device, "--threads", str(args.threads)], capture_output=True, text=True,
                                   timeout=args.timeout_s)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode or not lines:
                raise SystemExit(f"variant {name} failed (rc {child.returncode}):\n{child.stderr[-2000:]}")
            rows.append(json.loads(lines[-1]))
            print(lines[-1], flush=True)
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        memory = f"  GPU memory {mine[-1]['gpu_used_mib']} MiB" if "gpu_used_mib" in mine[-1] else ""
        builds = " ".join(f"{r['pipeline_build_s']:.2f}" for r in mine)
        decoders = " ".join(f"{r['decoder_s']:.2f}" for r in mine)
        print(f"{name:10s} Pipeline.build s: {builds}  decoder s: {decoders}{memory}")
    return rows


if __name__ == "__main__":
    main()
