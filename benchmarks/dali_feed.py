"""How long the DALI decoder's feed of one batch takes in Python, the way it was fed before and now.

    python -m benchmarks.dali_feed --input DIR [--images 256] [--busy 0] [--rounds 5] [--repeat 50]

The decoder thread hands DALI each batch's inputs through ``fn.external_source``; DALI's Python checks and wraps
every entry of a list input one by one, and takes an array input whole. Side by side in one run, interleaved, each
followed by DALI's own preparation of every output (``nvidia.dali.external_source._prep_data_for_feed_input``):

* ``per_sample``: the inputs as they were made before, four lists of one entry per image (the encoded files,
  each image's crop start and end, its id);
* ``ours``: :meth:`images.dali_decoder.DaliDecoder._source_item`, the encoded files as a list and the rest as one
  array each.

Prints milliseconds per batch for each and the ratio ``per_sample / ours``, alone and beside ``--busy`` threads
running Python (the decoder thread shares the GIL with the job's other threads).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import types

import numpy as np


def per_sample(batch, number: int):
    """The inputs as the decoder made them before: one list entry per image for every output."""
    ids = [np.array((number, i), np.int64) for i in range(len(batch.encoded))]
    starts = [np.array((top, left), np.float32) for left, top, _, _ in batch.boxes]
    ends = [np.array((bottom, right), np.float32) for _, _, right, bottom in batch.boxes]
    return (list(batch.encoded), starts, ends, ids)


def main(argv=None) -> dict:
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions, DecodeInput
    from nvidia.dali.external_source import _prep_data_for_feed_input

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="a folder of JPEGs")
    parser.add_argument("--images", type=int, default=256, help="images per batch (the GPU batch)")
    parser.add_argument("--busy", type=int, default=0, help="threads running Python beside the feed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=50, help="batches fed per round and way")
    args = parser.parse_args(argv)
    names = sorted(os.listdir(args.input))[:args.images]
    encoded = []
    for name in names:
        with open(os.path.join(args.input, name), "rb") as f:
            encoded.append(np.frombuffer(f.read(), np.uint8))
    boxes = [(float(i % 7), float(i % 5), 200.0 + i % 11, 180.0 + i % 13) for i in range(len(encoded))]
    batch = DecodeInput(encoded, boxes)
    decoder = types.SimpleNamespace(options=DaliDecoderOptions(device="cpu", max_batch=max(1, len(encoded))))

    def ours(batch, number):
        return DaliDecoder._source_item(decoder, batch, number)

    ways = {"per_sample": per_sample, "ours": ours}
    made = {name: way(batch, 3) for name, way in ways.items()}
    for a, b in zip(made["per_sample"], made["ours"]):  # the same samples, in the same order
        if len(a) != len(b) or any(not np.array_equal(x, y) for x, y in zip(a, b)):
            raise SystemExit("the two feeds differ")
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(args.busy)]
    for thread in threads:
        thread.start()
    times = {name: [] for name in ways}
    try:
        for _ in range(args.rounds):
            for name, way in ways.items():
                start = time.perf_counter()
                for number in range(args.repeat):
                    for output in way(batch, number):
                        _prep_data_for_feed_input(output, len(encoded), None)
                times[name].append((time.perf_counter() - start) / args.repeat)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    best = {name: min(values) for name, values in times.items()}
    ratio = best["per_sample"] / best["ours"]
    print(f"{len(encoded)} images a batch, beside {args.busy} busy threads, best of {args.rounds}: per_sample "
          f"{best['per_sample'] * 1e3:.2f} ms/batch, ours {best['ours'] * 1e3:.2f} ms/batch, ratio {ratio:.2f}x")
    return {"seconds_per_batch": times, "ratio_per_sample_vs_ours": ratio, "images": len(encoded),
            "busy": args.busy}


if __name__ == "__main__":
    main()
