"""GPU throughput, measured side by side in one run: `python -m benchmarks.throughput --device gpu`.

On a machine with a CUDA GPU, ONNX Runtime with the CUDA provider (onnxruntime-gpu) and NVIDIA DALI:

1. ``engine_device``: the engine alone on a uint8 batch already on the GPU (the ceiling);
   ``engine_host``: the same from a host numpy batch, for reference;
2. ``decoder``: the DALI decoder alone (encoded JPEGs in memory -> (N, 224, 224, 3) on the GPU);
3. ``ours_gpu``: ``pipelines.classify_images --providers cuda --decode gpu`` end to end (files on disk ->
   prediction files), whole process and stats.json's steady state;
4. ``noop_gpu``: the same pipeline with an engine that returns zeros (the Beam + decode floor);
5. ``ours_cpu``: ``--decode cpu`` (Pillow) on one pass over the corpus;
6. ``gpus``: one GPU vs two with the same SDK processes (``benchmarks/multi_gpu.py``), and with
   ``engine`` on a two-GPU machine, the engine alone on both GPUs at once (two threads, host batches).

The pipeline runs read a manifest that lists the corpus ``--repeat`` times, so start-up stays a small
share of the run. Top-1 agreement between ``--decode gpu`` and ``--decode cpu`` is reported. Each pipeline
run is sampled with nvidia-smi (GPU utilisation and memory, a timeline per second: ``gpu_samples``), and a
second table shows its steady and whole-process images/s against the engine alone, the seconds to the first
image and after the last (with ``--progress_every_s`` in ``--pipeline_args``), the GPU's mean utilisation and
memory peak, and its rows with another top-1 than the reference. Results: ``gpu_throughput.json`` and
``gpu_throughput.png`` in ``--output``, and the tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks.corpus import ensure_corpus
from benchmarks.multi_gpu import GpuSampler, edges, gpu_indices, run_gpus, steady_rate
from benchmarks.multi_gpu import table as gpus_table
from benchmarks.throughput import REPO_ROOT, agreement, run_child
from pipelines.partitions import committed_rows

_LOG = logging.getLogger("benchmarks.gpu")
DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "efficientnet_lite0.onnx")
TARGET = 0.7  # ours / engine alone on device-resident batches: the GPU path's goal (README)


#: Packages the worker image (Dockerfile) leaves out because Beam imports them at start whenever they are
#: importable: torch (RunInference) and pandas (Beam's type hints). The image build checks that a job starts
#: without either; the GPU benchmarks hide both from their jobs, so a lent host that has them starts as the image.
NOT_IN_WORKER_IMAGE = ("torch", "pandas")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput --device gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="gpu", choices=("gpu",))
    parser.add_argument("--images", type=int, default=5000, help="Distinct corpus JPEGs. Default: 5000.")
    parser.add_argument("--repeat", type=int, default=12,
                        help="Times the manifest lists the corpus for the --decode gpu runs. Default: 12.")
    parser.add_argument("--batch_size", type=int, default=256, help="Default: 256.")
    parser.add_argument("--hw_decoder_load", type=float, default=0.65, help="Default: 0.65.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="uint8 NHWC ONNX model. Default: the prepared one.")
    parser.add_argument("--output", default="benchmark_output/gpu", help="Default: benchmark_output/gpu.")
    parser.add_argument("--corpus_dir", default=None, help="Default: OUTPUT/corpus.")
    parser.add_argument("--min_seconds", type=float, default=5.0, help="Each in-process measurement runs this long.")
    parser.add_argument("--runs", default="engine,decoder,reader,ours_gpu,noop_gpu,ours_cpu",
                        help="Comma-separated subset to run, of engine, decoder, reader, ours_gpu, noop_gpu, "
                             "ours_cpu, gpus (one GPU vs two) and concurrency (threads, processes and the shared "
                             "model, each checked against one thread). Default: all but gpus and concurrency.")
    parser.add_argument("--processes", default="1,4,8",
                        help="gpus: SDK process counts to compare one GPU and two GPUs at (1: one process on one "
                             "GPU, the single-process baseline). Default: 1,4,8.")
    parser.add_argument("--gpus_repeat", type=int, default=40,
                        help="gpus: times the manifest lists the corpus for the multi-process runs. Default: 40.")
    parser.add_argument("--pipeline_args", default="", help="Extra classify_images flags for every pipeline run.")
    parser.add_argument("--hide", default=",".join(NOT_IN_WORKER_IMAGE),
                        help="Packages hidden from the pipeline runs (comma-separated; '' for none): those this "
                             "machine may have and the worker image (Dockerfile) does not. Beam imports torch and "
                             "pandas at start when it can (3.4 s and 1.3 s of a job's start on H100 hosts, "
                             "benchmarks/NOTES.md), which no Dataflow worker of this project pays. Default: "
                             f"{','.join(NOT_IN_WORKER_IMAGE)}.")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                        help="ONNX Runtime precision of the pipeline runs (--precision); the engine alone is measured "
                             "at fp32 and, with fp16 here, at fp16 too, so each ratio has its own ceiling. Default: "
                             "fp32.")
    parser.add_argument("--configs", default="",
                        help="concurrency: the configurations to run, a comma list of benchmarks.concurrency's "
                             "names (threads1, the reference, always runs). Default: all.")
    parser.add_argument("--reference_output", default=None,
                        help="ours_gpu: the output folder of a one-thread run over the same corpus (e.g. the "
                             "concurrency run's threads1) whose top-1 per image every ours_gpu row is checked "
                             "against. Without it, each row is checked against its image's majority top-1 in the "
                             "run itself (the corpus is listed --repeat times).")
    parser.add_argument("--timeout_s", type=float, default=1200.0)
    return parser.parse_args(argv)


def _timed(fn, count_per_call: int, min_seconds: float) -> Dict[str, Any]:
    fn()  # warm-up
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            break
    return {"images_per_second": round(calls * count_per_call / elapsed, 1), "calls": calls,
            "seconds": round(elapsed, 3), "batch": count_per_call}


def decode_inputs(blobs: List[bytes], batch_size: int):
    """Full batches of encoded files with their crop boxes, as the pipeline's reader makes them."""
    from images.dali_decoder import DecodeInput
    from images.pillow_decoder import PreprocessConfig, crop_box
    from images.prescreen import screen

    config = PreprocessConfig()
    out = []
    for i in range(0, len(blobs) - batch_size + 1, batch_size):
        chunk = blobs[i:i + batch_size]
        boxes = []
        for data in chunk:
            s = screen(data, config.max_pixels)
            boxes.append(crop_box(s.width, s.height, config))
        out.append(DecodeInput([np.frombuffer(b, np.uint8) for b in chunk], boxes))
    return out


def measure_reader(args, paths: List[str]) -> Dict[str, Any]:
    """The pipeline's batch reader alone (read + pre-screen, GPU route), outside Beam."""
    from transforms.images import ImageRef, ReadImageBatches
    from images.pillow_decoder import PreprocessConfig

    reader = ReadImageBatches(PreprocessConfig(), gpu_decode=True, threads=-1, prefetch=2)
    reader.setup()
    refs = [ImageRef(p) for p in paths]
    batches = [refs[i:i + args.batch_size] for i in range(0, len(refs), args.batch_size)]
    start = time.perf_counter()
    count = 0
    for batch in batches:
        for out in reader.process(batch, None, None):
            count += len(getattr(out, "refs", ()))
    for out in reader.finish_bundle():
        count += len(getattr(out, "refs", ()))
    elapsed = time.perf_counter() - start
    reader.teardown()
    return {"images_per_second": round(count / elapsed, 1), "images": count, "seconds": round(elapsed, 3)}


def measure_in_process(args, blobs: List[bytes], runs: Sequence[str]) -> Dict[str, Any]:
    """The engine alone (device and host batches) and the decoder alone."""
    from images.dali_decoder import DaliDecoder, DaliDecoderOptions
    from engines.onnxruntime_engine import OnnxRuntimeLoader

    out: Dict[str, Any] = {}
    bs = args.batch_size
    arrays = decode_inputs(blobs, bs)
    decoder = DaliDecoder(DaliDecoderOptions(max_batch=bs, device="gpu", hw_decoder_load=args.hw_decoder_load,
                                             threads=min(16, os.cpu_count() or 1)))
    if "decoder" in runs:
        def decode_all():
            for _ in decoder.decode(arrays):
                pass
        result = _timed(decode_all, bs * len(arrays), args.min_seconds)
        result["batch"] = bs
        out["decoder"] = result
    if "engine" in runs:
        stream = decoder.decode([arrays[0]])
        batch = next(stream)  # a real decoded batch, resident on the GPU while we hold it
        host = np.array(batch.images.as_cpu()) if hasattr(batch.images, "as_cpu") else np.asarray(batch.images)
        out["decoder_threads"] = decoder.options.threads_here
        logits = {}
        for precision in ("fp32", "fp16") if args.precision == "fp16" else ("fp32",):
            suffix = "" if precision == "fp32" else "_fp16"
            engine = OnnxRuntimeLoader(args.model, ("cuda",), precision=precision)()
            name = engine.input_names()[0]
            out[f"engine_device{suffix}"] = _timed(lambda: engine.infer({name: batch.images}, ["logits"]), bs,
                                                   args.min_seconds)
            out[f"engine_host{suffix}"] = _timed(lambda: engine.infer({name: host}, ["logits"]), bs, args.min_seconds)
            device_logits = engine.infer({name: batch.images}, ["logits"])["logits"]
            host_logits = engine.infer({name: host}, ["logits"])["logits"]
            out[f"device_vs_host_max_abs_diff{suffix}"] = float(np.abs(device_logits - host_logits).max())
            logits[precision] = device_logits
            engine.close()
        if "fp16" in logits:
            same_top1 = logits["fp16"].argmax(1) == logits["fp32"].argmax(1)
            out["fp16_vs_fp32"] = {"max_abs_logits_diff": float(np.abs(logits["fp16"] - logits["fp32"]).max()),
                                   "top1_agreement": float(same_top1.mean())}
        for _ in stream:
            pass
        if len(gpu_indices()) >= 2:
            out["engine_host_two_gpus"] = engine_on_two_gpus(args, host)
    decoder.close()
    return out


def engine_on_two_gpus(args, host: np.ndarray) -> Dict[str, Any]:
    """The two-GPU ceiling: one engine per GPU, each driven by its own thread with host batches
    (ONNX Runtime releases the GIL while it runs)."""
    import threading

    from engines.onnxruntime_engine import OnnxRuntimeLoader

    engines = [OnnxRuntimeLoader(args.model, ("cuda",), device=gpu)() for gpu in (0, 1)]
    name = engines[0].input_names()[0]
    results: List[Dict[str, Any]] = [{}, {}]

    def drive(i):
        results[i] = _timed(lambda: engines[i].infer({name: host}, ["logits"]), len(host), args.min_seconds)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for engine in engines:
        engine.close()
    return {"images_per_second": round(sum(r["images_per_second"] for r in results), 1),
            "per_gpu": [r["images_per_second"] for r in results]}


def hidden_packages(output: str, names: Sequence[str]) -> Optional[str]:
    """A folder of stand-ins that raise ImportError for ``names``, to put first on a child's PYTHONPATH so
    it starts as in the worker image, which lacks them; None when there is nothing to hide."""
    if not names:
        return None
    folder = os.path.join(output, "hidden_packages")
    for name in names:
        os.makedirs(os.path.join(folder, name.strip()), exist_ok=True)
        with open(os.path.join(folder, name.strip(), "__init__.py"), "w") as f:
            f.write(f"raise ImportError({name.strip()!r} + ' is hidden by benchmarks.gpu --hide: the worker image '\n"
                    f"                  'does not have it')\n")
    return folder


def child_pythonpath(*first: Optional[str]) -> str:
    """A child job's PYTHONPATH: ``first`` (the hidden packages, the checkout to run) ahead of this process's."""
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return os.pathsep.join([p for p in first if p] + inherited)


def _pipeline(args, name: str, manifest: str, extra: List[str], module: str = "pipelines.classify_images",
              env: Optional[Dict[str, str]] = None):
    out_dir = os.path.join(args.output, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    argv = ["--input", manifest, "--output", out_dir, "--model", args.model, "--providers", "cuda",
            "--batch_size", str(args.batch_size), "--hw_decoder_load", str(args.hw_decoder_load),
            "--progress_every_s", "0", "--precision", args.precision] + extra + args.pipeline_args.split()
    _LOG.info("%s: %s %s", name, module, " ".join(argv))
    hidden = hidden_packages(args.output, [p for p in args.hide.split(",") if p.strip()])
    if hidden:
        env = {**(env or {}), "PYTHONPATH": child_pythonpath(hidden, REPO_ROOT)}
    with GpuSampler() as sampler:
        child = run_child(name, module, argv, args.output, args.timeout_s, env_extra=env)
    rows = committed_rows(out_dir, "predictions", missing_ok=True)
    dead = committed_rows(out_dir, "dead_letter", missing_ok=True)
    timing = child.get("timing") or {}
    stats = timing.get("stats") or {}
    entry = {"name": name, "args": argv, "returncode": child["returncode"], "prediction_rows": len(rows),
             "dead_letter_rows": len(dead), "process_seconds": child["process_seconds"],
             "run_seconds": timing.get("wall_seconds"), "import_seconds": timing.get("import_seconds"),
             "stats_images_per_second": stats.get("images_per_second"), "cpu": child.get("cpu"),
             "stage_seconds": stats.get("stage_seconds"), "settings": stats.get("settings"),
             "log": child["log"]}
    images = len(rows) + len(dead)
    if child["returncode"] == 0 and child["process_seconds"]:
        entry["whole_process_images_per_second"] = round(len(rows) / child["process_seconds"], 1)
    if child["returncode"] == 0 and timing.get("wall_seconds"):
        entry["run_images_per_second"] = round(len(rows) / timing["wall_seconds"], 1)
        entry["startup_share"] = round(1 - (stats.get("wall_seconds") or 0) / child["process_seconds"], 3) \
            if stats.get("wall_seconds") else None
    if child["returncode"] != 0:
        entry["error_tail"] = child["log_text"][-2000:]
    # With --progress_every_s in --pipeline_args: seconds to the first image and after the last, and the
    # rate between (benchmarks.multi_gpu).
    entry["edges"] = edges(child.get("log_text") or "", timing.get("import_seconds"), child["process_seconds"])
    entry["steady"] = steady_rate(child.get("log_text") or "")
    # Every GPU's utilisation and memory while it ran: the mean while busy, the peaks, one value per second.
    entry["gpu_samples"] = sampler.summary()
    entry["inputs"] = images
    entry["top1"] = {}
    for row in rows:
        entry["top1"].setdefault(row["uri"], int(row["top_k"][0]["class_id"]))
    return entry


def ceiling_of(results: Dict[str, Any], precision: str) -> Optional[float]:
    """The engine alone's images/s at the precision the pipeline runs ran at: what ours is a share of."""
    return (results.get("engine_device_fp16" if precision == "fp16" else "engine_device") or {}).get(
        "images_per_second")


def ratios_of(results: Dict[str, Any], precision: str) -> Dict[str, float]:
    """Each pipeline run's figures as shares of the engine alone (:func:`ceiling_of`), steady state included,
    and ours against the no-op engine's floor."""
    ceiling = ceiling_of(results, precision)
    ratios: Dict[str, float] = {}
    ours = results.get("ours_gpu") or {}
    if ceiling:
        for key in ("stats_images_per_second", "run_images_per_second", "whole_process_images_per_second"):
            if ours.get(key):
                ratios[f"ours_gpu_{key}_vs_engine_device"] = round(ours[key] / ceiling, 3)
        if (ours.get("steady") or {}).get("images_per_second"):
            ratios["ours_gpu_steady_vs_engine_device"] = round(ours["steady"]["images_per_second"] / ceiling, 3)
        if (results.get("ours_cpu") or {}).get("run_images_per_second"):
            ratios["ours_cpu_run_vs_engine_device"] = round(results["ours_cpu"]["run_images_per_second"] / ceiling, 3)
    noop = results.get("noop_gpu") or {}
    if noop.get("run_images_per_second") and ours.get("run_images_per_second"):
        ratios["ours_gpu_vs_noop_run"] = round(ours["run_images_per_second"] / noop["run_images_per_second"], 3)
    return ratios


#: The pipeline runs of one benchmark, in the order they are shown, with their labels.
PIPELINE_RUNS = (("ours_gpu", "ours --decode gpu"), ("noop_gpu", "no-op engine, --decode gpu (floor)"),
                 ("ours_cpu", "ours --decode cpu"))


def runs_table(summary: Dict[str, Any], precision: str = "fp32") -> str:
    """One line per pipeline run: steady and whole-process images/s with their shares of the engine alone,
    the launch and exit edges, the GPU's mean utilisation while busy and its memory peak, and the rows whose
    top-1 differs from the reference's. A figure the run did not give (no progress lines, no nvidia-smi) is -."""
    r = summary["results"]
    ceiling = ceiling_of(r, precision)
    lines = ["| run | steady images/s (x engine) | whole process images/s (x engine) | first image / exit after "
             "last (s) | GPU busy % (mean while busy) / memory peak MiB | rows with another top-1 |",
             "|---|---|---|---|---|---|"]

    def rate(value):
        if not value:
            return "-"
        return f"{value:,.0f} ({value / ceiling:.2f})" if ceiling else f"{value:,.0f}"

    for name, label in PIPELINE_RUNS:
        entry = r.get(name)
        if not entry:
            continue
        edge = entry.get("edges") or {}
        gpus = (entry.get("gpu_samples") or {}).get("gpus") or {}
        busy = " + ".join(f"{g['mean_utilisation']:.0f} / {g['max_memory_mib']:,.0f}" for g in gpus.values()) or "-"
        labels = entry.get("labels") or {}
        differ = (f"{labels['rows_with_another_top1']} of {labels['rows']} ({labels.get('near_ties', 0)} near ties)"
                  if "rows_with_another_top1" in labels else "-")
        lines.append(f"| {label} | {rate((entry.get('steady') or {}).get('images_per_second'))} | "
                     f"{rate(entry.get('whole_process_images_per_second'))} | "
                     f"{edge.get('first_image_s', '-')} / {edge.get('after_last_image_s', '-')} | {busy} | "
                     f"{differ} |")
    return "\n".join(lines)


def check_labels(out_dir: str, reference_dir: Optional[str]) -> Dict[str, Any]:
    """Rows of a run whose top-1 differs from a one-thread run's for the same image (``reference_dir``),
    or, without one, from the image's majority top-1 within the run: a batch paired with another batch's
    images shows here as rows with another image's label, whatever the speed."""
    from benchmarks.concurrency import compare, differing_rows, top1_by_uri

    top1 = top1_by_uri(out_dir)
    reference = top1_by_uri(reference_dir) if reference_dir else top1
    missing = sorted(set(top1) - set(reference))
    return {"against": reference_dir or "the run's own majority per image", **compare(reference, top1),
            "images_without_reference": len(missing),
            "examples": differing_rows(reference_dir or out_dir, out_dir, limit=4)}


def table(summary: Dict[str, Any]) -> str:
    r = summary["results"]
    lines = ["| what | images/s |", "|---|---|"]

    def add(label, value):
        if value is not None:
            lines.append(f"| {label} | {value:,.0f} |")

    add("engine alone, uint8 batches on the GPU", (r.get("engine_device") or {}).get("images_per_second"))
    add("engine alone, host numpy batches", (r.get("engine_host") or {}).get("images_per_second"))
    add("engine alone fp16, uint8 batches on the GPU", (r.get("engine_device_fp16") or {}).get("images_per_second"))
    add("engine alone on two GPUs at once, host numpy batches",
        (r.get("engine_host_two_gpus") or {}).get("images_per_second"))
    add("DALI decoder alone (decode+resize+crop on the GPU)", (r.get("decoder") or {}).get("images_per_second"))
    add("batch reader alone (read + header pre-screen, no Beam)", (r.get("reader") or {}).get("images_per_second"))
    for name, label in PIPELINE_RUNS:
        entry = r.get(name)
        if entry:
            lines.append(f"| {label}: stats.json / run / whole process | "
                         f"{entry.get('stats_images_per_second') or 0:,.0f} / "
                         f"{entry.get('run_images_per_second') or 0:,.0f} / "
                         f"{entry.get('whole_process_images_per_second') or 0:,.0f} |")
    return "\n".join(lines)


def chart(summary: Dict[str, Any], path: str) -> None:
    from PIL import Image, ImageDraw

    bars = [(label, value) for label, value in summary["bars"] if value]
    width, row = 900, 40
    image = Image.new("RGB", (width, 60 + row * len(bars)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 15), summary["title"], fill="black")
    top = max(v for _, v in bars) if bars else 1
    for i, (label, value) in enumerate(bars):
        y = 50 + i * row
        draw.text((20, y + 8), label, fill="black")
        draw.rectangle((330, y, 330 + int(480 * value / top), y + 28), fill=(70, 130, 180))
        draw.text((335 + int(480 * value / top), y + 8), f"{value:,.0f}", fill="black")
    image.save(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    os.makedirs(args.output, exist_ok=True)
    args.output = os.path.abspath(args.output)
    started = time.time()
    corpus = ensure_corpus(args.corpus_dir or os.path.join(args.output, "corpus"), args.images)
    blobs = [open(p, "rb").read() for p in corpus.paths]
    manifest = os.path.join(args.output, "inputs.txt")
    with open(manifest, "w") as f:
        for _ in range(args.repeat):
            f.write("\n".join(corpus.paths) + "\n")
    once = os.path.join(args.output, "inputs_once.txt")
    with open(once, "w") as f:
        f.write("\n".join(corpus.paths) + "\n")
    results: Dict[str, Any] = {}
    if "reader" in runs:
        results["reader"] = measure_reader(args, corpus.paths * args.repeat)
    if "engine" in runs or "decoder" in runs:
        results.update(measure_in_process(args, blobs, runs))
    if "ours_gpu" in runs:
        results["ours_gpu"] = _pipeline(args, "ours_gpu", manifest, ["--decode", "gpu"])
        results["ours_gpu"]["labels"] = check_labels(os.path.join(args.output, "ours_gpu"), args.reference_output)
    if "noop_gpu" in runs:
        results["noop_gpu"] = _pipeline(args, "noop_gpu", manifest, ["--decode", "gpu"],
                                                module="benchmarks.noop_job")
    if "ours_cpu" in runs:
        results["ours_cpu"] = _pipeline(args, "ours_cpu", once, ["--decode", "cpu"])
    if "concurrency" in runs:
        from benchmarks.concurrency import run_concurrency

        results["concurrency"] = run_concurrency(
            args, lambda name, path, extra, env: _pipeline(args, name, path, extra, env=env), corpus.paths)
    if "gpus" in runs:
        results["gpus"] = run_gpus(args, lambda name, path, extra, env: _pipeline(args, name, path, extra, env=env),
                                   corpus.paths)
    # Ours against the engine alone at the precision ours ran at.
    ratios = ratios_of(results, args.precision)
    ours, noop = results.get("ours_gpu") or {}, results.get("noop_gpu") or {}
    top1 = {}
    if ours.get("top1") and (results.get("ours_cpu") or {}).get("top1"):
        top1["gpu_vs_cpu_decode"] = agreement(ours["top1"], results["ours_cpu"]["top1"])
    for entry in results.values():
        if isinstance(entry, dict):
            entry.pop("top1", None)
    try:
        import subprocess

        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # no nvidia-smi: the name is only a label
        gpu = "unknown"
    summary = {"title": f"GPU throughput ({gpu}, batch {args.batch_size}, {len(corpus.paths)} JPEGs x {args.repeat})",
               "gpu": gpu, "cores": os.cpu_count(), "images": len(corpus.paths), "repeat": args.repeat,
               "batch_size": args.batch_size, "precision": args.precision, "hw_decoder_load": args.hw_decoder_load,
               "results": results,
               "ratios": ratios, "target_ours_vs_engine_device": TARGET, "top1_agreement": top1,
               "seconds": round(time.time() - started, 1)}
    summary["bars"] = [("engine alone (device)", (results.get("engine_device") or {}).get("images_per_second")),
                       ("engine alone (host)", (results.get("engine_host") or {}).get("images_per_second")),
                       ("DALI decoder alone", (results.get("decoder") or {}).get("images_per_second")),
                       ("batch reader alone", (results.get("reader") or {}).get("images_per_second")),
                       ("no-op engine pipeline", noop.get("run_images_per_second")),
                       ("ours --decode gpu", ours.get("run_images_per_second")),
                       ("ours --decode cpu", (results.get("ours_cpu") or {}).get("run_images_per_second"))]
    with open(os.path.join(args.output, "gpu_throughput.json"), "w") as f:
        json.dump(summary, f, indent=1)
    chart(summary, os.path.join(args.output, "gpu_throughput.png"))
    print(summary["title"])
    print(table(summary))
    print(runs_table(summary, args.precision))
    print("ratios:", json.dumps(ratios), "top-1 agreement:", json.dumps(top1))
    if (results.get("ours_gpu") or {}).get("labels"):
        print("ours_gpu rows with another top-1:", json.dumps(results["ours_gpu"]["labels"]))
    if results.get("concurrency"):
        from benchmarks.concurrency import table as concurrency_table

        print(concurrency_table(results["concurrency"]))
    if results.get("gpus"):
        print(gpus_table(results["gpus"]))
        print("two GPUs / one GPU:", json.dumps(results["gpus"]["ratios"]))
        for entry in results["gpus"]["runs"].values():
            for gpu, sample in entry["gpu_samples"]["gpus"].items():
                print(f"{entry['name']} {gpu} utilisation % per second:", sample["utilisation_per_second"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
