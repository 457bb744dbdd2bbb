"""Who holds the GIL in a job's steady state: py-spy attached to a running job once it has scored some images.

    python -m benchmarks.gil_window --output DIR [--after_images 30000] [--seconds 8] [--idle_seconds 6] \\
        [--module pipelines.classify_images] -- --input INPUTS --model MODEL --providers cuda --decode gpu ...

A whole-run profile mixes the start-up (imports and DALI's build hold the GIL for seconds) with the scoring, and the
threads of a GPU job share one GIL, so what limits it is the GIL-held time per image summed over every thread, not
one thread's wall time (benchmarks/NOTES.md, "The check's stat and the rows' top-k"). This starts the job (through
``benchmarks.run_timed``, so its progress lines carry the process's clock), waits until ``--after_images`` are scored,
records ``py-spy record --gil --threads`` for ``--seconds`` (each sample names the thread holding the GIL, if any),
then optionally ``--idle`` for ``--idle_seconds`` (every thread's wall time), and lets the job finish. The job also
times every garbage collection (``gc.callbacks``), which holds the GIL on whichever thread's allocation set it off.

Writes under ``--output``: the job's own output in ``job_output`` (unless the job's flags name one), ``gil.txt`` and ``idle.txt`` (py-spy's raw stacks), ``job.log``, ``result.json`` (the
job's ``run_timed`` document) and ``gil_window.json``: the share of the window the GIL was held, each thread's share,
each thread's heaviest frames, the collections inside the window, and the job's steady rate. Prints a summary.
Needs ``py-spy`` (the ``benchmark`` extra) and permission to attach to a child process (root, or ptrace allowed).
Hides torch and pandas from the job as the GPU benchmarks do (``benchmarks.gpu.NOT_IN_WORKER_IMAGE``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.gpu import NOT_IN_WORKER_IMAGE, child_pythonpath, hidden_packages
from benchmarks.multi_gpu import steady_rate
from benchmarks.throughput import REPO_ROOT, BenchmarkError

_PROGRESS = re.compile(r"progress: (\d+) images scored")
_LINE_NUMBER = re.compile(r" \((.*?):\d+\)$")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--module", default="pipelines.classify_images",
                        help="The job's module (run as benchmarks.run_timed runs it). Default: pipelines.classify_images; "
                        "benchmarks.noop_job runs the same job with an engine that returns at once.")
    parser.add_argument("--after_images", type=int, default=30000, help="Attach once this many are scored.")
    parser.add_argument("--seconds", type=float, default=8.0, help="The GIL window. Default: 8.")
    parser.add_argument("--idle_seconds", type=float, default=0.0, help="An --idle window after it. Default: none.")
    parser.add_argument("--rate", type=int, default=100, help="Samples a second. Default: 100.")
    parser.add_argument("--top", type=int, default=15, help="Frames listed per thread. Default: 15.")
    parser.add_argument("--timeout_s", type=float, default=900.0)
    parser.add_argument("--py_spy", default=shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                                                  "py-spy"))
    args = parser.parse_args(own)
    if not job:
        parser.error("give the job's flags after --, e.g. -- --input INPUTS --model MODEL")
    if args.seconds <= 0 or args.idle_seconds < 0 or args.rate < 1 or args.after_images < 0:
        parser.error("--seconds must be > 0, --idle_seconds >= 0, --rate >= 1, --after_images >= 0")
    if not any(a == "--progress_every_s" or a.startswith("--progress_every_s=") for a in job):
        job += ["--progress_every_s", "0.5"]  # the lines this waits on, and the steady rate's
    if not any(a == "--output" or a.startswith("--output=") for a in job):
        job += ["--output", os.path.join(os.path.abspath(args.output), "job_output")]
    args.job = job
    return args


def parse_raw(text: str) -> Dict[str, Any]:
    """py-spy's raw output (``thread;frame;frame... COUNT`` per line) -> ``{"samples", "threads": {name: count},
    "inclusive": {name: Counter(frame -> count)}, "leaf": {name: Counter}}``; frames without line numbers, each
    counted once per stack (a recursive frame is not counted twice)."""
    threads: collections.Counter = collections.Counter()
    inclusive: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    leaf: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = re.sub(r"^thread \((?:0x)?[0-9a-fA-F]+\): ?", "", frames[0]) or frames[0]
        total += n
        threads[thread] += n
        names = [_LINE_NUMBER.sub(r" (\1)", frame) for frame in frames[1:]]
        for name in set(names):
            inclusive[thread][name] += n
        if names:
            leaf[thread][names[-1]] += n
    return {"samples": total, "threads": threads, "inclusive": inclusive, "leaf": leaf}


#: Where this repository's own frames live (py-spy names files relative to their sys.path entry).
PROJECT_DIRS = ("transforms/", "images/", "engines/", "pipelines/")
#: The job's entry frames, on every stack of its launching thread: not listed among its project frames.
ENTRY_FRAMES = ("<module> (pipelines/classify_images.py)", "main (pipelines/classify_images.py)",
                "run (pipelines/classify_images.py)")


def summarize(profile: Dict[str, Any], ticks: int, top: int) -> Dict[str, Any]:
    """Shares of ``ticks`` (the window's sampling ticks): with ``--gil`` each sample is the one thread holding the GIL
    at a tick, so ``held`` is the share of the window the GIL was held; per thread, its share, its heaviest frames
    (``inclusive``: a frame counts every sample it is on the stack of), those of this repository (``project``) and
    the innermost frames (``leaf``)."""
    threads = {}
    for thread, count in profile["threads"].most_common():
        ranked = sorted(profile["inclusive"][thread].items(), key=lambda item: (-item[1], item[0]))
        threads[thread] = {
            "share": round(count / ticks, 4), "samples": count,
            "inclusive": [[frame, n] for frame, n in ranked[:top]],
            "project": [[frame, n] for frame, n in ranked if frame not in ENTRY_FRAMES and
                        frame.rsplit(" (", 1)[-1].startswith(PROJECT_DIRS)][:top],
            "leaf": [[frame, n] for frame, n in sorted(profile["leaf"][thread].items(),
                                                         key=lambda item: (-item[1], item[0]))[:top]]}
    return {"ticks": ticks, "samples": profile["samples"], "held": round(profile["samples"] / ticks, 4),
            "threads": threads}


def collections_in(log: List[List[float]], start: float, end: float) -> Dict[str, Any]:
    """The garbage collections ``[monotonic end, generation, seconds]`` that ended inside ``[start, end]``."""
    out: Dict[str, Any] = {}
    for generation in (0, 1, 2):
        times = [s for t, g, s in log if g == generation and start <= t <= end]
        out[f"gen{generation}"] = {"collections": len(times), "seconds": round(sum(times), 4),
                                   "longest_s": round(max(times, default=0.0), 4)}
    out["seconds"] = round(sum(v["seconds"] for v in out.values()), 4)
    return out


def child(argv: Sequence[str]) -> int:
    """``child GC.json RESULT.json MODULE ARGS...``: ``benchmarks.run_timed`` with every garbage collection timed,
    written to GC.json as ``[monotonic end, generation, seconds]`` when the job ends."""
    import atexit
    import gc
    import threading

    from benchmarks import run_timed

    gc_path, rest = argv[0], list(argv[1:])
    started: Dict[int, float] = {}
    log: List[List[float]] = []  # appended under the GIL by whichever thread collects

    def timed(phase: str, info: Dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            started[threading.get_ident()] = now
        else:
            log.append([now, info["generation"], now - started.pop(threading.get_ident(), now)])

    def write() -> None:
        with open(gc_path, "w") as f:
            json.dump(log, f)

    gc.callbacks.append(timed)
    atexit.register(write)
    return run_timed.main(rest)


def _scored(log_path: str) -> int:
    try:
        with open(log_path, errors="replace") as f:
            found = _PROGRESS.findall(f.read())
    except OSError:
        return 0
    return int(found[-1]) if found else 0


def _record(args, pid: int, out: str, seconds: float, mode: str) -> Tuple[float, float, str]:
    """py-spy for ``seconds`` on ``pid``; (monotonic start, end, what it printed)."""
    cmd = [args.py_spy, "record", "--pid", str(pid), mode, "--threads", "--format", "raw", "--rate", str(args.rate),
           "--duration", str(max(1, round(seconds))), "--output", out]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    end = time.monotonic()
    if done.returncode != 0 or not os.path.exists(out):
        raise BenchmarkError(f"py-spy failed ({done.returncode}): {done.stderr.strip()[-600:]} (it must be allowed to "
                             "attach: run as root, or allow ptrace)")
    return start, end, done.stderr


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["child"]:
        return child(argv[1:])
    args = parse_args(argv)
    if not os.path.exists(args.py_spy):
        raise SystemExit(f"py-spy not found at {args.py_spy}: pip install py-spy (the benchmark extra has it)")
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, name) for name in ("gil.txt", "idle.txt", "job.log", "result.json", "gc.json")}
    for path in paths.values():
        if os.path.exists(path):
            os.remove(path)
    hidden = hidden_packages(out, NOT_IN_WORKER_IMAGE)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=child_pythonpath(hidden, REPO_ROOT))
    cmd = [sys.executable, "-m", "benchmarks.gil_window", "child", paths["gc.json"], paths["result.json"], args.module,
           *args.job]
    with open(paths["job.log"], "w") as log:
        job = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    windows: Dict[str, Tuple[float, float]] = {}
    try:
        deadline = time.monotonic() + args.timeout_s
        while _scored(paths["job.log"]) < args.after_images:
            if job.poll() is not None:
                raise BenchmarkError(f"the job ended (rc {job.returncode}) before {args.after_images} images were "
                                     f"scored: see {paths['job.log']}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"no {args.after_images} images scored in {args.timeout_s} s")
            time.sleep(0.1)
        attached_at = _scored(paths["job.log"])
        start, end, _ = _record(args, job.pid, paths["gil.txt"], args.seconds, "--gil")
        windows["gil"] = (start, end)
        scored_after_gil = _scored(paths["job.log"])
        if args.idle_seconds:
            windows["idle"] = _record(args, job.pid, paths["idle.txt"], args.idle_seconds, "--idle")[:2]
        returncode = job.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    if job.returncode != 0:
        raise BenchmarkError(f"the job failed (rc {job.returncode}): see {paths['job.log']}")
    with open(paths["gil.txt"]) as f:
        profile = parse_raw(f.read())
    seconds = max(1, round(args.seconds))
    gil = summarize(profile, seconds * args.rate, args.top)
    with open(paths["gc.json"]) as f:
        gc_log = json.load(f)
    with open(paths["job.log"], errors="replace") as f:
        job_log = f.read()
    report = {"job": args.job, "module": args.module, "attached_at_images": attached_at,
              "scored_in_gil_window": scored_after_gil - attached_at, "gil_window": gil,
              "gc_in_gil_window": collections_in(gc_log, *windows["gil"]),
              "steady": steady_rate(job_log), "returncode": returncode}
    if "idle" in windows:
        with open(paths["idle.txt"]) as f:
            idle = parse_raw(f.read())
        report["idle_window"] = summarize(idle, max(1, round(args.idle_seconds)) * args.rate, args.top)
    with open(os.path.join(out, "gil_window.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"GIL held {gil['held']:.0%} of a {seconds} s window ({report['scored_in_gil_window']} images scored in it, "
          f"attached at {attached_at}); garbage collection {report['gc_in_gil_window']['seconds']} s of it")
    for thread, entry in gil["threads"].items():
        print(f"  {entry['share']:6.1%}  {thread}: " + "; ".join(f"{frame} {n}" for frame, n in entry["project"][:4]))
    print(f"steady: {report['steady']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
