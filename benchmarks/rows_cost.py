"""What the rows cost the bundle thread per batch: top-k over the model's outputs, alone and beside threads
running Python, this checkout's ``top_k_batch`` against another checkout's, interleaved in one process.

    python -m benchmarks.rows_cost --old DIR [--batch 256] [--classes 1000] [--k 5] [--busy 2] [--rounds 5]

``DIR`` is another checkout (e.g. ``git archive REV | tar x -C DIR``); its ``transforms/postprocess.py`` is loaded
beside this one's. Each numpy pass over a whole batch lets go of the GIL and must win it back afterwards, which
beside busy threads can cost up to the switch interval (5 ms) per pass, so the count of passes matters more
there than their microseconds. The outputs are logits drawn at an ImageNet model's scale (seeded). Before timing,
both must list the same classes with the same scores in every row where no two of the old row's listed scores
(rounded to 6 places, as written) are equal: such ties may be ordered differently, the rule for them being the new
code's. Prints milliseconds per batch, best round, and the
ratio ``old / new`` for each load.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np

from benchmarks.read_syscalls import busy_threads
from transforms.postprocess import top_k_batch


def load_top_k(checkout: str) -> Callable:
    """``top_k_batch`` from ``checkout``'s ``transforms/postprocess.py``, under a module name of its own."""
    path = os.path.join(checkout, "transforms", "postprocess.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--old {checkout} has no transforms/postprocess.py: give a checkout of this repository")
    spec = importlib.util.spec_from_file_location("old_postprocess", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module.top_k_batch


def untied_rows_differing(old: List[list], new: List[list]) -> int:
    """Rows whose lists differ although the old row's listed scores (as written, rounded) are all different, plus
    any difference in the number of rows (0 when the two agree)."""
    differ = 0
    for a, b in zip(old, new):
        scores = [c["score"] for c in a]
        if len(set(scores)) == len(scores) and a != b:
            differ += 1
    return differ + abs(len(old) - len(new))


def main(argv=None) -> Dict[int, dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="another checkout of this repository")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--busy", type=int, default=2, help="threads running Python beside the rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40, help="batches per way per round")
    args = parser.parse_args(argv)
    old_top_k = load_top_k(args.old)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((args.batch, args.classes)) * 2.5).astype(np.float32)
    labels = [f"class {i}" for i in range(args.classes)]
    ways = {"old": lambda: old_top_k(logits, args.k, labels), "new": lambda: top_k_batch(logits, args.k, labels)}
    differ = untied_rows_differing(ways["old"](), ways["new"]())
    if differ:
        raise SystemExit(f"the two top-k differ in {differ} rows without ties: not the same rows")
    results = {}
    for busy in sorted({0, args.busy}):
        ms: Dict[str, List[float]] = {name: [] for name in ways}
        with busy_threads(busy):
            for _ in range(args.rounds):
                for name, way in ways.items():
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        way()
                    ms[name].append((time.perf_counter() - start) / args.calls * 1e3)
        best = {name: min(values) for name, values in ms.items()}
        results[busy] = {"ms_per_batch": ms, "ratio_old_vs_new": best["old"] / best["new"]}
        print(f"beside {busy} busy threads, batch {args.batch} x {args.classes} classes, top {args.k}, best of "
              f"{args.rounds}: old {best['old']:.2f} ms/batch, new {best['new']:.2f} ms/batch, ratio "
              f"{best['old'] / best['new']:.2f}x")
    return results


if __name__ == "__main__":
    main()
