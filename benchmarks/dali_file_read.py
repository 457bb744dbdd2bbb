"""Decoding batches of files with DALI when Python reads them and when DALI reads them itself, beside threads
running Python.

    python -m benchmarks.dali_file_read --input DIR [--files 2048] [--batch 256] [--busy 1] [--rounds 2]

The GPU path's floor (the pipeline with a no-op engine, benchmarks/NOTES.md) is set by per-file system calls from
Python reader threads: each lets go of the GIL and must win it back from the bundle thread. DALI 2.4 can read the
files on its own threads (``fn.io.file.read``, each path given as a byte array), where no call needs the GIL. Side by
side in one run, interleaved, each with the same DALI CPU decoder (``device_id=None``, as CI has it):

* ``python_reads``: what the GPU path's readers do per file (``benchmarks.read_syscalls.ours``: one ``stat`` for the
  size limit, then ``engines.storage.read_local``) on this thread, the bytes fed to DALI;
* ``dali_reads``: the paths fed to DALI, which reads and decodes them.

Both decode the same pixels (checked on the first batch before timing). Prints images/s for each, alone and beside
``--busy`` threads, and their ratio. A measurement for a design choice, not a pipeline change: the job's pre-screen
(the header check that gives each image its crop box and its dead-letter reason) still needs the bytes in Python.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Dict, List

import numpy as np

from benchmarks.read_syscalls import ours as python_read, rates_beside_busy, whole_batches


def _pipelines(batch: int, threads: int):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def by_path():
        return fn.decoders.image(fn.io.file.read(fn.external_source(name="paths", dtype=types.UINT8)), device="cpu")

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=1)
    def by_bytes():
        return fn.decoders.image(fn.external_source(name="encoded", dtype=types.UINT8), device="cpu")

    pipes = {"python_reads": by_bytes(), "dali_reads": by_path()}
    for pipe in pipes.values():
        pipe.build()
    return pipes


def _decode(name: str, pipe, paths: List[str]) -> List[np.ndarray]:
    if name == "dali_reads":
        pipe.feed_input("paths", [np.frombuffer(os.fsencode(p), np.uint8) for p in paths])
    else:
        pipe.feed_input("encoded", [np.frombuffer(python_read(p), np.uint8) for p in paths])
    out, = pipe.run()
    return [np.asarray(out.at(i)) for i in range(len(paths))]


def main(argv=None) -> Dict[int, Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of JPEGs")
    parser.add_argument("--files", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dali_threads", type=int, default=2)
    parser.add_argument("--busy", type=int, default=1, help="threads running Python beside the decodes")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    batches = whole_batches(args.input, args.files, args.batch)
    pipes = _pipelines(args.batch, args.dali_threads)
    first = {name: _decode(name, pipe, batches[0]) for name, pipe in pipes.items()}
    for i, (a, b) in enumerate(zip(first["python_reads"], first["dali_reads"])):
        if not np.array_equal(a, b):  # False for another shape too
            raise SystemExit(f"the two ways decode {batches[0][i]} differently")
    images = len(batches) * args.batch
    results: Dict[int, Dict[str, object]] = {}
    timed = {name: functools.partial(_decode, name, pipe) for name, pipe in pipes.items()}
    for busy, rates, best in rates_beside_busy(timed, batches, args.rounds, args.busy):
        results[busy] = {"images_per_second": rates, "ratio_dali_vs_python": best["dali_reads"] / best["python_reads"]}
        print(f"beside {busy} busy threads, {images} images in batches of {args.batch}, best of {args.rounds}: "
              f"python_reads {best['python_reads']:.0f} images/s, dali_reads {best['dali_reads']:.0f} images/s, "
              f"ratio {best['dali_reads'] / best['python_reads']:.2f}x", flush=True)
    return results


if __name__ == "__main__":
    main()
