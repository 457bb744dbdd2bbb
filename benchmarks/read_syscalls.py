"""How long a reader thread takes to stat and read one small file, alone and beside threads running Python.

    python -m benchmarks.read_syscalls --input DIR [--files 1500] [--busy 2] [--rounds 3]

Every system call lets go of the GIL; beside threads running Python, winning it back can cost up to the
interpreter's switch interval, whatever the call itself took. So a reader's cost per file on a busy worker is
set by how many calls it makes, not by their microseconds. Side by side in one run, interleaved:

* ``open_read``: the file's regular-file check and its size limit each ``stat`` it, then Python's
  ``open(path, "rb").read()`` (open, fstat, ioctl, two lseeks, fstat, two reads, close): 11 calls;
* ``ours``: what ``images.reading.load_image`` does now, one ``stat`` (:func:`images.reading.regular_file_size`)
  then :func:`engines.storage.read_local` with its size (open, two reads, close): 5 calls.

Prints seconds per file for each and the ratio ``open_read / ours``.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from engines import storage
from images.reading import regular_file_size


def open_read(path: str) -> bytes:
    os.stat(path)
    os.path.getsize(path)
    with open(path, "rb") as f:
        return f.read()


def ours(path: str) -> bytes:
    refused, size = regular_file_size(path)
    if refused is not None:
        raise OSError(refused)
    return storage.read_local(path, size)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of small files (images)")
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--busy", type=int, default=2, help="threads running Python beside the reads")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    files = sorted(os.path.join(args.input, name) for name in os.listdir(args.input))[:args.files]
    for path in files:  # both read the same bytes, and the page cache holds them before timing
        if open_read(path) != ours(path):
            raise SystemExit(f"the two reads differ on {path}")
    results = {}
    for busy in sorted({0, args.busy}):
        stop = threading.Event()

        def spin():
            n = 0
            while not stop.is_set():
                n += 1

        threads = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
        for thread in threads:
            thread.start()
        times = {"open_read": [], "ours": []}
        try:
            for _ in range(args.rounds):
                for name, read in (("open_read", open_read), ("ours", ours)):
                    start = time.perf_counter()
                    for path in files:
                        read(path)
                    times[name].append((time.perf_counter() - start) / len(files))
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        best = {name: min(values) for name, values in times.items()}
        results[busy] = {"seconds_per_file": times, "ratio_open_read_vs_ours": best["open_read"] / best["ours"]}
        print(f"beside {busy} busy threads, {len(files)} files, best of {args.rounds}: open_read "
              f"{best['open_read'] * 1e6:.1f} us/file, ours {best['ours'] * 1e6:.1f} us/file, ratio "
              f"{best['open_read'] / best['ours']:.2f}x")
    return results


if __name__ == "__main__":
    main()
