"""The GPU path's reader three ways, alone and beside threads running Python: each file on its own, files read
together by DALI after a ``stat`` each, and files read together with the sizes the job's check already found.

    python -m benchmarks.read_together --input DIR [--files 2048] [--batch 256] [--busy 1] [--rounds 2]

What the GPU decoder's reader threads do with a batch of local files (``transforms.images.ReadImageBatches``):

* ``alone``: :func:`images.reading.load_image` per file, as before 2026-12-07: a ``stat``, then open, read, read
  and close, then the header pre-screen;
* ``together_stat``: :func:`images.reading.load_local_batch` without sizes: a ``stat`` per file, the files read by
  DALI in one call (:mod:`images.dali_file_reader`), then the pre-screen;
* ``together``: the same with each file's size given, as the job's check passes it on the ref: no system call per
  file from this thread.

Every way must give each file the same outcome (checked on the first batch before timing). Each system call from a
Python thread lets go of the GIL and must win it back from the busy threads, which is what the ratios show.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Callable, Dict, List

from benchmarks.read_syscalls import rates_beside_busy, whole_batches


def _ways(config) -> Dict[str, Callable[[List[str], List[int]], list]]:
    from images.dali_file_reader import DaliFileReader
    from images.reading import load_image, load_local_batch

    reader = DaliFileReader()
    return {"alone": lambda paths, sizes: [load_image(p, config, True, read_timeout_s=None) for p in paths],
            "together_stat": lambda paths, sizes: load_local_batch(paths, config, reader, True),
            "together": lambda paths, sizes: load_local_batch(paths, config, reader, True, sizes)}


def _with_sizes(way, sizes: Dict[str, int], paths: List[str]) -> list:
    return way(paths, [sizes[p] for p in paths])


def _outcome(decoded):
    return decoded.error, decoded.stage, decoded.encoded, decoded.box


def main(argv=None) -> Dict[int, Dict[str, object]]:
    from images.pillow_decoder import PreprocessConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of JPEGs")
    parser.add_argument("--files", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--busy", type=int, default=1, help="threads running Python beside the reads")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    batches = whole_batches(args.input, args.files, args.batch)
    sizes = {path: os.stat(path).st_size for batch in batches for path in batch}
    ways = _ways(PreprocessConfig())
    first = {name: [_outcome(d) for d in way(batches[0], [sizes[p] for p in batches[0]])] for name, way in ways.items()}
    for name, outcomes in first.items():
        for path, got, want in zip(batches[0], outcomes, first["alone"]):
            if got != want:
                raise SystemExit(f"{name} gives {path} another outcome than reading it alone")
    images = len(batches) * args.batch
    results: Dict[int, Dict[str, object]] = {}
    timed = {name: functools.partial(_with_sizes, way, sizes) for name, way in ways.items()}
    for busy, rates, best in rates_beside_busy(timed, batches, args.rounds, args.busy):
        ratios = {name: best[name] / best["alone"] for name in ways if name != "alone"}
        results[busy] = {"images_per_second": rates, "ratios_vs_alone": ratios}
        print(f"beside {busy} busy threads, {images} files in batches of {args.batch}, best of {args.rounds}: "
              + ", ".join(f"{name} {best[name]:.0f} files/s" for name in ways) + "; against alone: "
              + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()), flush=True)
    return results


if __name__ == "__main__":
    main()
