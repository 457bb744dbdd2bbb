"""How fast the job's check fingerprints local files, alone and beside threads running Python, with its
``lstat`` keeping the GIL (:mod:`engines.held_stat`) against letting go of it as ``os.lstat`` does.

    python -m benchmarks.check_stat --input DIR [--files 4096] [--batch 256] [--busy 2] [--rounds 3]

Both ways run ``transforms.scored.local_fingerprint`` on the same files, interleaved in each round, after
checking that they give every file the same fingerprint. Prints files/s for each (best round) and the ratio
``held / letting go``. On a worker the bundle thread runs the check beside the decoder's reader threads and
the engine's callers; the busy threads stand in for them.
"""

from __future__ import annotations

import argparse
import os
from typing import List

from benchmarks.read_syscalls import rates_beside_busy, whole_batches
from engines import held_stat
from transforms.scored import local_fingerprint


def held(batch: List[str]) -> list:
    return [local_fingerprint(path) for path in batch]


def letting_go(batch: List[str]) -> list:
    with held_stat.letting_go():
        return [local_fingerprint(path) for path in batch]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of files (images)")
    parser.add_argument("--files", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256, help="files per check, as the job's batch")
    parser.add_argument("--busy", type=int, default=2, help="threads running Python beside the check")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    batches = whole_batches(args.input, args.files, args.batch)
    if not held_stat.held_available():
        raise SystemExit("this platform has no GIL-holding statx (glibc 2.28+ on Linux): both ways would be os.lstat")
    if not held_stat.folder_is_local(os.path.dirname(batches[0][0])):
        raise SystemExit(f"{args.input} is not on a local filesystem (engines.held_stat.LOCAL_FILESYSTEMS), where "
                         "the check lets go of the GIL anyway: give a folder on a local disk")
    for batch in batches:
        if held(batch) != letting_go(batch):
            raise SystemExit(f"the two ways fingerprint the files of {batch[0]}'s batch differently")
    results = {}
    for busy, rates, best in rates_beside_busy({"held": held, "letting_go": letting_go}, batches, args.rounds,
                                               args.busy):
        ratio = best["held"] / best["letting_go"]
        results[busy] = {"files_per_second": rates, "ratio_held_vs_letting_go": ratio}
        if not held_stat.held_available():
            raise SystemExit("the held call was switched off while timing (the kernel refused statx)")
        print(f"beside {busy} busy threads, {sum(map(len, batches))} files, best of {args.rounds}: held "
              f"{best['held']:,.0f} files/s, letting go {best['letting_go']:,.0f} files/s, ratio {ratio:.1f}x")
    return results


if __name__ == "__main__":
    main()
