"""The DALI decoder alone under several settings, side by side (one GPU, one run).

    python -m benchmarks.decoder_sweep [--images 5000] [--batch_size 256]

Prints images/s for each variant (threads, hardware decoder share, crop boxes from the host vs
computed inside the graph) so the defaults in images/dali_decoder.py rest on numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


from benchmarks.corpus import ensure_corpus
from images.dali_decoder import DaliDecoder, DaliDecoderOptions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--corpus_dir", default="benchmark_output/corpus")
    parser.add_argument("--variants", default="threads=8;threads=16;threads=8,crop_box=graph;"
                                              "threads=16,crop_box=graph;threads=16,hw_decoder_load=1.0")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    corpus = ensure_corpus(args.corpus_dir, args.images)
    from benchmarks.gpu import decode_inputs

    bs = args.batch_size
    batches = decode_inputs([open(p, "rb").read() for p in corpus.paths], bs)
    results = {}
    for variant in args.variants.split(";"):
        kwargs = {}
        for item in filter(None, variant.split(",")):
            key, value = item.split("=")
            kwargs[key] = type(getattr(DaliDecoderOptions, key))(value)
        decoder = DaliDecoder(DaliDecoderOptions(max_batch=bs, device="gpu", **kwargs))
        for _ in decoder.decode(batches[:4]):
            pass
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for _ in decoder.decode(batches):
                n += bs
        results[variant] = round(n / (time.perf_counter() - start), 1)
        print(f"{variant:40s} {results[variant]:10,.0f} images/s", flush=True)
        decoder.close()
        del decoder
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
