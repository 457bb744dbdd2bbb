"""How long a reader thread takes to stat and read one small file, alone and beside threads running Python.

    python -m benchmarks.read_syscalls --input DIR [--files 1500] [--busy 2] [--rounds 3] [--switch_interval_ms 0.5]

Every system call lets go of the GIL; beside threads running Python, winning it back can cost up to the
interpreter's switch interval, whatever the call itself took. So a reader's cost per file on a busy worker is
set by how many calls it makes, not by their microseconds. Side by side in one run, interleaved:

* ``open_read``: the file's regular-file check and its size limit each ``stat`` it, then Python's
  ``open(path, "rb").read()`` (open, fstat, ioctl, two lseeks, fstat, two reads, close): 11 calls;
* ``ours``: what ``images.reading.load_image`` does now, one ``stat`` (:func:`images.reading.regular_file_size`)
  then :func:`engines.storage.read_local` with its size (open, two reads, close): 5 calls.

Prints seconds per file for each and the ratio ``open_read / ours``. With ``--switch_interval_ms``, ``ours`` is
also timed with that switch interval (``sys.setswitchinterval``), interleaved with the others, and the
busy threads' progress (their loop iterations per second) is given beside each, so what a shorter interval
takes from the threads running Python shows next to what it gives the reader.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from typing import Callable, Dict, Iterator, List, Tuple

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


def whole_batches(folder: str, files: int, batch: int) -> List[List[str]]:
    """The first ``files`` files of ``folder`` (by name) in whole batches of ``batch``: a short last batch would
    time a smaller batch, so it is left out.

    Raises:
        SystemExit: fewer files than one batch, with the fix.
    """
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))[:files]
    whole = len(paths) // batch
    if not whole:
        raise SystemExit(f"--input {folder} holds {len(paths)} files, fewer than one batch of {batch}: "
                         "give more files or a smaller --batch")
    return [paths[i * batch:(i + 1) * batch] for i in range(whole)]


def interleaved_rates(ways: Dict[str, Callable[[List[str]], object]], batches: List[List[str]],
                      rounds: int) -> Dict[str, List[float]]:
    """Files/s of each way over all ``batches``, per round; the ways take turns within each round."""
    files = sum(len(batch) for batch in batches)
    rates: Dict[str, List[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            for batch in batches:
                way(batch)
            rates[name].append(files / (time.perf_counter() - start))
    return rates


def rates_beside_busy(ways: Dict[str, Callable[[List[str]], object]], batches: List[List[str]], rounds: int,
                      busy: int) -> Iterator[Tuple[int, Dict[str, List[float]], Dict[str, float]]]:
    """:func:`interleaved_rates` alone and then beside ``busy`` threads running Python (once when ``busy`` is 0):
    ``(busy threads, rates per round, best rate)`` for each, each way's best its highest round."""
    for count in sorted({0, busy}):
        with busy_threads(count):
            rates = interleaved_rates(ways, batches, rounds)
        yield count, rates, {name: max(values) for name, values in rates.items()}


@contextlib.contextmanager
def busy_threads(count: int) -> Iterator[List[int]]:
    """``count`` daemon threads running a Python loop until the block ends; yields their loop counts, a slot each
    (each thread writes only its own)."""
    stop = threading.Event()
    spins = [0] * count

    def spin(slot):
        while not stop.is_set():
            spins[slot] += 1

    threads = [threading.Thread(target=spin, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        yield spins
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of small files (images)")
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--busy", type=int, default=2, help="threads running Python beside the reads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--switch_interval_ms", type=float, default=None,
                        help="also time ours with this thread switch interval (sys.setswitchinterval)")
    args = parser.parse_args(argv)
    files = sorted(os.path.join(args.input, name) for name in os.listdir(args.input))[:args.files]
    for path in files:  # both read the same bytes, and the page cache holds them before timing
        if open_read(path) != ours(path):
            raise SystemExit(f"the two reads differ on {path}")
    results = {}
    default_interval = sys.getswitchinterval()
    variants = [("open_read", open_read, None), ("ours", ours, None)]
    if args.switch_interval_ms:
        variants.append(("ours_switched", ours, args.switch_interval_ms / 1e3))
    for busy in sorted({0, args.busy}):
        times = {name: [] for name, _, _ in variants}
        progress = {name: [] for name, _, _ in variants}
        with busy_threads(busy) as spins:
            for _ in range(args.rounds):
                for name, read, interval in variants:
                    sys.setswitchinterval(interval or default_interval)
                    try:
                        spun, start = sum(spins), time.perf_counter()
                        for path in files:
                            read(path)
                        seconds = time.perf_counter() - start
                        progress[name].append((sum(spins) - spun) / seconds)
                    finally:
                        sys.setswitchinterval(default_interval)
                    times[name].append(seconds / len(files))
        best = {name: min(values) for name, values in times.items()}
        results[busy] = {"seconds_per_file": times, "ratio_open_read_vs_ours": best["open_read"] / best["ours"]}
        line = (f"beside {busy} busy threads, {len(files)} files, best of {args.rounds}: open_read "
                f"{best['open_read'] * 1e6:.1f} us/file, ours {best['ours'] * 1e6:.1f} us/file, ratio "
                f"{best['open_read'] / best['ours']:.2f}x")
        if "ours_switched" in best:
            results[busy]["ratio_ours_vs_switched"] = best["ours"] / best["ours_switched"]
            results[busy]["busy_iterations_per_second"] = progress
            line += (f"; with a {args.switch_interval_ms:g} ms switch interval ours {best['ours_switched'] * 1e6:.1f} "
                     f"us/file ({best['ours'] / best['ours_switched']:.2f}x)")
            if busy:
                mean = {name: sum(v) / len(v) for name, v in progress.items()}
                line += (f", the busy threads' progress {mean['ours_switched'] / 1e6:.2f} M iterations/s against "
                         f"{mean['ours'] / 1e6:.2f} M at {default_interval * 1e3:g} ms")
        print(line)
    return results


if __name__ == "__main__":
    main()
