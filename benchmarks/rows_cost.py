"""What the rows cost the bundle thread per batch: top-k over the model's outputs, and the rows' JSON Lines as the
sink writes them, alone and beside threads running Python, this checkout against another, interleaved in one
process.

    python -m benchmarks.rows_cost --old DIR [--batch 256] [--classes 1000] [--k 5] [--busy 2] [--rounds 5]

``DIR`` is another checkout (e.g. ``git archive REV | tar x -C DIR``); its ``transforms/postprocess.py`` and
``transforms/sinks.py`` are loaded beside this one's. ``topk`` times ``top_k_batch``; ``write`` times
``JsonLinesSink.write`` of one batch of rows (the new top-k's, with a path and the model's name each) into memory,
after checking that both write the same JSON values. Each numpy pass over a whole batch lets go of the GIL and must win it back afterwards, which
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
import io
import json
import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np

from benchmarks.read_syscalls import busy_threads
from transforms.postprocess import top_k_batch
from transforms.sinks import JsonLinesSink


def load_module(checkout: str, name: str):
    """``transforms/NAME.py`` of ``checkout``, under a module name of its own."""
    path = os.path.join(checkout, "transforms", f"{name}.py")
    if not os.path.isfile(path):
        raise SystemExit(f"--old {checkout} has no transforms/{name}.py: give a checkout of this repository")
    spec = importlib.util.spec_from_file_location(f"old_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def sink_writer(sink_class) -> Callable[[list], bytes]:
    """A function writing one block of rows with ``sink_class`` (a ``JsonLinesSink``) and returning the bytes."""
    def write(rows):
        buffer = io.BytesIO()
        sink = sink_class(blocks=True)
        sink.open(buffer)
        sink.write(rows)
        return buffer.getvalue()
    return write


def untied_rows_differing(old: List[list], new: List[list]) -> int:
    """Rows whose lists differ although the old row's listed scores (as written, rounded) are all different, plus
    any difference in the number of rows (0 when the two agree)."""
    differ = 0
    for a, b in zip(old, new):
        scores = [c["score"] for c in a]
        if len(set(scores)) == len(scores) and a != b:
            differ += 1
    return differ + abs(len(old) - len(new))


def main(argv=None) -> Dict[int, Dict[str, dict]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="another checkout of this repository")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--busy", type=int, default=2, help="threads running Python beside the rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40, help="batches per way per round")
    args = parser.parse_args(argv)
    old_top_k = load_module(args.old, "postprocess").top_k_batch
    old_write, new_write = sink_writer(load_module(args.old, "sinks").JsonLinesSink), sink_writer(JsonLinesSink)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((args.batch, args.classes)) * 2.5).astype(np.float32)
    labels = [f"class {i}" for i in range(args.classes)]
    rows = [{"uri": f"/data/images/{i:06d}.jpg", "model": "efficientnet_lite0.onnx@sha256:db113c5655b6", "top_k": row}
            for i, row in enumerate(top_k_batch(logits, args.k, labels))]
    parts = {"topk": {"old": lambda: old_top_k(logits, args.k, labels), "new": lambda: top_k_batch(logits, args.k, labels)},
             "write": {"old": lambda: old_write(rows), "new": lambda: new_write(rows)}}
    differ = untied_rows_differing(parts["topk"]["old"](), parts["topk"]["new"]())
    if differ:
        raise SystemExit(f"the two top-k differ in {differ} rows without ties: not the same rows")
    texts = [write() for write in parts["write"].values()]
    written = [[json.loads(line) for line in text.splitlines()] for text in texts]
    if written[0] != written[1] or written[0] != rows or any(text.count(b"\n") != len(rows) for text in texts):
        raise SystemExit("the two sinks write different JSON values for the same rows, or not one line each")
    results = {}
    for busy in sorted({0, args.busy}):
        ms: Dict[str, Dict[str, List[float]]] = {part: {"old": [], "new": []} for part in parts}
        with busy_threads(busy):
            for _ in range(args.rounds):
                for part, ways in parts.items():
                    for name, way in ways.items():
                        start = time.perf_counter()
                        for _ in range(args.calls):
                            way()
                        ms[part][name].append((time.perf_counter() - start) / args.calls * 1e3)
        results[busy] = {}
        for part, times in ms.items():
            best = {name: min(values) for name, values in times.items()}
            results[busy][part] = {"ms_per_batch": times, "ratio_old_vs_new": best["old"] / best["new"]}
            print(f"beside {busy} busy threads, {part}, batch {args.batch} x {args.classes} classes, top {args.k}, "
                  f"best of {args.rounds}: old {best['old']:.2f} ms/batch, new {best['new']:.2f} ms/batch, ratio "
                  f"{best['old'] / best['new']:.2f}x")
    return results


if __name__ == "__main__":
    main()
