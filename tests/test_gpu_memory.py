"""The free-GPU-memory check at load (engines/gpu_memory.py): the ledger logic with the GPU's free memory
given by the test (no GPU here), and the model loader that uses it with a real engine and DALI decoder on
the CPU. The same check against a real GPU's memory is in tests/gpu/test_gpu_decode.py."""

from __future__ import annotations

import json

import pytest

from engines.base import EngineError
from engines.gpu_memory import GIB, GpuMemoryLedger, loader_key


class FakeGpu:
    """Free memory as the test sets it; a load takes ``takes`` bytes of it."""

    def __init__(self, free: int, total: int = 24 * GIB):
        self.free, self.total = free, total
        self.asked = 0

    def __call__(self, device):
        self.asked += 1
        return self.free, self.total


def _load(ledger, gpu, key="model-a", takes=7 * GIB):
    with ledger.loading(key, "an onnxruntime engine + 1 DALI gpu decoder at batch 256"):
        gpu.free -= takes


def test_the_first_copy_records_what_it_took_and_a_copy_that_would_not_fit_is_refused(tmp_path):
    gpu = FakeGpu(22 * GIB)
    ledger = GpuMemoryLedger(0, str(tmp_path), free=gpu)
    _load(ledger, gpu)  # nothing recorded yet: it loads, and takes 7 GiB
    assert json.loads(open(ledger.path).read())["model-a"]["bytes"] == 7 * GIB
    _load(ledger, gpu)  # 15 GiB free >= 7 + 0.5: it fits
    assert gpu.free == 8 * GIB
    _load(ledger, gpu, takes=GIB)  # 8 GiB free: the third copy fits; the ledger keeps the most, 7 GiB
    with pytest.raises(EngineError) as error:  # the fourth copy on this 24 GiB card (an L4's) stops here
        _load(GpuMemoryLedger(0, str(tmp_path), free=gpu), gpu)
    message = str(error.value)
    assert "GPU 0 has 7.0 GiB free of 24.0 GiB" in message and "took 7.0 GiB" in message
    assert "--share_model_across_processes" in message and "--precision fp16" in message
    assert "an onnxruntime engine + 1 DALI gpu decoder at batch 256" in message


def test_another_loader_is_not_judged_by_this_ones_figure_and_a_failed_load_records_nothing(tmp_path):
    gpu = FakeGpu(10 * GIB)
    ledger = GpuMemoryLedger(1, str(tmp_path), free=gpu)
    _load(ledger, gpu, key="big", takes=9 * GIB)
    _load(ledger, gpu, key="small", takes=GIB // 4)  # 1 GiB free: "big"'s 9 GiB says nothing about it
    with pytest.raises(RuntimeError):
        with ledger.loading("broken", "x"):
            raise RuntimeError("the engine failed to load")
    assert sorted(json.loads(open(ledger.path).read())) == ["big", "small"]
    assert ledger.path.endswith("engines-gpu1-memory.json")


def test_a_torn_ledger_is_started_again(tmp_path):
    gpu = FakeGpu(10 * GIB)
    ledger = GpuMemoryLedger(0, str(tmp_path), free=gpu)
    open(ledger.path, "w").write("{not json")
    _load(ledger, gpu, takes=GIB)
    assert json.loads(open(ledger.path).read())["model-a"]["bytes"] == GIB


def test_the_key_names_every_field_of_the_loader(model_path):
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from transforms.inference import ScorerLoader

    a = ScorerLoader(OnnxRuntimeLoader(model_path, ("cuda",)), warmup_images=256)
    assert loader_key(a) == loader_key(ScorerLoader(OnnxRuntimeLoader(model_path, ("cuda",)), warmup_images=256))
    assert loader_key(a) != loader_key(ScorerLoader(OnnxRuntimeLoader(model_path, ("cuda",)), warmup_images=128))
    assert loader_key(a) != loader_key(ScorerLoader(OnnxRuntimeLoader(model_path, ("cuda",), precision="fp16"),
                                                    warmup_images=256))


def test_the_model_loader_warms_up_under_the_check_and_stops_a_copy_that_does_not_fit(tmp_path, model_path,
                                                                                       monkeypatch):
    """The real engine and DALI decoder on the CPU, loaded as on a GPU whose free memory the test sets."""
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")
    from engines import gpu_memory
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from images.dali_decoder import DaliDecoderOptions
    from images.pillow_decoder import PreprocessConfig
    from transforms.inference import ScorerLoader

    import threading

    from engines.onnxruntime_engine import OnnxRuntimeEngine

    gpu = FakeGpu(20 * GIB)
    ledger = GpuMemoryLedger(0, str(tmp_path), free=gpu)
    monkeypatch.setattr(gpu_memory, "ledger_for", lambda device: ledger)
    runs, real_infer = [], OnnxRuntimeEngine.infer
    monkeypatch.setattr(OnnxRuntimeEngine, "infer", lambda self, feed, outputs=None: runs.append(
        (threading.current_thread().name.split("_")[0], next(iter(feed.values())).shape)) or
        real_infer(self, feed, outputs))
    loader = ScorerLoader(OnnxRuntimeLoader(model_path), DaliDecoderOptions(device="cpu", max_batch=8, threads=1),
                          PreprocessConfig(), warmup_images=8)
    scorer = loader()
    try:
        assert gpu.asked == 2 and json.loads(open(ledger.path).read())[loader_key(loader)]["bytes"] == 0
        # The engine's first full batch ran on its own thread while the decoder was built, then one went
        # through decoder and engine.
        assert runs == [("warm-up", (8, 224, 224, 3)), (threading.current_thread().name.split("_")[0], (8, 224, 224, 3))]
        gpu.free = GIB // 4  # below the 0 B recorded + the margin
        with pytest.raises(EngineError, match=r"GPU 0 has 0.2 GiB free .*DALI cpu decoder at batch 8"):
            loader()
    finally:
        scorer.close()


def test_warm_up_scores_one_full_batch_through_the_decoder_or_as_pixels(model_path):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from images.dali_decoder import DaliDecoderOptions
    from images.pillow_decoder import PreprocessConfig
    from transforms.inference import ScorerLoader

    for decoder in (DaliDecoderOptions(device="cpu", max_batch=6, threads=1), None):
        scorer = ScorerLoader(OnnxRuntimeLoader(model_path), decoder, PreprocessConfig())()
        seen = []
        real = scorer.engine.infer
        scorer.engine.infer = lambda feed, outputs=None: seen.append(next(iter(feed.values())).shape) or \
            real(feed, outputs)
        try:
            scorer.warm_up(6, PreprocessConfig())
        finally:
            scorer.close()
        assert seen == [(6, 224, 224, 3)]


def _decoder_threads():
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("dali-decoder") and t.is_alive()]


def test_a_load_that_fails_after_its_decoders_were_built_leaves_no_decoder_running(tmp_path, model_path, monkeypatch):
    pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI (the test extra installs nvidia-dali-cuda130)")
    from engines import gpu_memory
    from engines.onnxruntime_engine import OnnxRuntimeLoader
    from images.dali_decoder import DaliDecoderOptions
    from images.pillow_decoder import PreprocessConfig
    from transforms.inference import ScorerLoader

    options = DaliDecoderOptions(device="cpu", max_batch=2, threads=1)
    before = _decoder_threads()
    calls = []

    def free(device):  # the measurement after the load fails (cudaMemGetInfo after a launch failure)
        calls.append(device)
        if len(calls) == 2:
            raise EngineError("cudaMemGetInfo failed: cudaErrorLaunchFailure")
        return 20 * GIB, 24 * GIB

    monkeypatch.setattr(gpu_memory, "ledger_for", lambda device: GpuMemoryLedger(0, str(tmp_path), free=free))
    with pytest.raises(EngineError, match="cudaErrorLaunchFailure"):
        ScorerLoader(OnnxRuntimeLoader(model_path), options, PreprocessConfig(), warmup_images=2)()
    assert _decoder_threads() == before

    class TwoInputs:  # refused by the scorer after the decoders are built, on the path without a check
        kind = "fake"

        def input_names(self):
            return ["a", "b"]

        def device_index(self):
            return None

        def close(self):
            pass

    with pytest.raises(EngineError, match="the model has 2"):
        ScorerLoader(lambda: TwoInputs(), options, PreprocessConfig())()
    assert _decoder_threads() == before


def test_a_ledger_that_cannot_be_used_is_started_again_or_skipped_and_old_figures_expire(tmp_path, monkeypatch):
    import time

    gpu = FakeGpu(10 * GIB)
    ledger = GpuMemoryLedger(0, str(tmp_path), free=gpu)
    open(ledger.path, "w").write("[1, 2]")  # JSON, but not a ledger
    _load(ledger, gpu, takes=GIB)
    assert json.loads(open(ledger.path).read())["model-a"]["bytes"] == GIB
    # A figure from more than a day ago says nothing about today's code and drivers: it is not held against a load.
    stale = {"model-a": {"bytes": 30 * GIB, "at": time.time() - 2 * 86400}}
    open(ledger.path, "w").write(json.dumps(stale))
    _load(ledger, gpu, takes=GIB)  # 9 GiB free < 30 GiB, but stale
    assert json.loads(open(ledger.path).read())["model-a"]["bytes"] == GIB
    # A ledger that cannot be opened (another user's file, a folder in its place): the copy loads unchecked.
    blocked = GpuMemoryLedger(2, str(tmp_path), free=gpu)
    (tmp_path / "engines-gpu2-memory.json").mkdir()
    _load(blocked, gpu, takes=GIB)
    assert gpu.free == 7 * GIB  # three copies of 1 GiB loaded


class SlowLoads:
    """Copies loading on threads at once against one FakeGpu: each takes its bytes in two halves with a pause
    between, and the test sees how many were inside their load at the same time."""

    def __init__(self, gpu):
        import threading

        self.gpu = gpu
        self.inside = self.most_inside = 0
        self.lock = threading.Lock()

    def load(self, ledger, key="model-a", takes=7 * GIB, pause=0.3):
        import time

        with ledger.loading(key, "an onnxruntime engine + 1 DALI gpu decoder at batch 256"):
            with self.lock:
                self.inside += 1
                self.most_inside = max(self.most_inside, self.inside)
                self.gpu.free -= takes // 2
            time.sleep(pause)
            with self.lock:
                self.gpu.free -= takes - takes // 2
                self.inside -= 1


def _at_once(*calls):
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
    return [f.exception() for f in futures]


def test_copies_that_fit_by_the_recorded_figure_load_at_once_and_the_rest_wait_then_are_refused(tmp_path):
    gpu = FakeGpu(39 * GIB, total=40 * GIB)
    loads = SlowLoads(gpu)
    ledger = lambda: GpuMemoryLedger(0, str(tmp_path), free=gpu)  # noqa: E731  (each process opens its own)
    loads.load(ledger(), pause=0)  # the first copy loads alone and records 7 GiB; 32 GiB free after it
    assert loads.most_inside == 1
    # Five more copies start together: those that fit beside the loads in progress (counted at their whole
    # figures) load side by side, the others wait for them; four fit in all, and the fifth, finding 4 GiB
    # free once the others are done, is refused as before.
    errors = _at_once(*[lambda: loads.load(ledger())] * 5)
    assert loads.most_inside >= 2
    assert sorted(type(e).__name__ for e in errors) == ["EngineError"] + ["NoneType"] * 4
    assert "GPU 0 has 4.0 GiB free of 40.0 GiB" in str(next(e for e in errors if e))
    # What copies loading side by side saw the free memory fall by mixes their loads: it is not recorded.
    assert json.loads(open(ledger().path).read())["model-a"]["bytes"] == 7 * GIB
    assert json.loads(open(ledger().path).read())["loading"] == {"loads": {}, "waiting": {}}  # none left


def test_memory_taken_by_others_during_a_load_is_not_counted_as_that_loads_progress(tmp_path):
    """Another process allocates (its engine session, made before its copy registers) while a copy loads: the next
    copy is judged by the free memory less the loading copy's whole figure, and is refused as one after another
    would be, not let in to run out of memory."""
    import threading
    import time

    gpu = FakeGpu(23 * GIB)
    ledger = lambda: GpuMemoryLedger(0, str(tmp_path), free=gpu)  # noqa: E731
    _load(ledger(), gpu)  # 7 GiB recorded, 16 free
    halfway = threading.Event()

    def slow_copy():
        with ledger().loading("model-a", "a"):
            gpu.free -= 7 * GIB // 2
            halfway.set()
            time.sleep(0.5)
            gpu.free -= 7 * GIB - 7 * GIB // 2

    def late_copy():
        halfway.wait()
        gpu.free -= 3 * GIB  # someone else's allocation
        _load(ledger(), gpu)

    errors = _at_once(slow_copy, late_copy)
    assert errors[0] is None and isinstance(errors[1], EngineError), errors
    assert gpu.free == 6 * GIB  # the late copy took nothing


def test_a_copy_without_a_figure_is_not_kept_waiting_by_copies_that_keep_arriving(tmp_path):
    import threading
    import time

    gpu = FakeGpu(79 * GIB, total=80 * GIB)
    ledger = lambda: GpuMemoryLedger(0, str(tmp_path), free=gpu)  # noqa: E731
    _load(ledger(), gpu, key="m", takes=GIB)
    gpu.free += GIB
    stop = time.monotonic() + 4

    def arriving(offset):
        time.sleep(offset)
        while time.monotonic() < stop:
            with ledger().loading("m", "m"):
                time.sleep(0.2)

    threads = [threading.Thread(target=arriving, args=(offset,)) for offset in (0, 0.1)]
    for t in threads:
        t.start()
    time.sleep(0.15)
    start = time.monotonic()
    with ledger().loading("n", "another model, no figure yet"):
        waited = time.monotonic() - start
    for t in threads:
        t.join()
    assert waited < 2, waited  # it waited for the loads in progress only, not for the window to close


def test_a_load_whose_final_measurement_fails_leaves_no_registration(tmp_path):
    gpu = FakeGpu(20 * GIB)
    ledger = lambda: GpuMemoryLedger(0, str(tmp_path), free=gpu)  # noqa: E731
    _load(ledger(), gpu, takes=GIB)
    failing = {"now": False}

    def free(device):
        if failing["now"]:
            failing["now"] = False
            raise EngineError("cudaMemGetInfo failed")
        return gpu(device)

    with pytest.raises(EngineError, match="cudaMemGetInfo"):
        with GpuMemoryLedger(0, str(tmp_path), free=free).loading("model-a", "m"):
            failing["now"] = True  # the load went well; reading the free memory after it fails
    assert json.loads(open(ledger().path).read())["loading"]["loads"] == {}
    _load(ledger(), gpu, key="other", takes=GIB)  # a copy without a figure does not wait for a leftover


def test_a_copy_without_a_figure_loads_alone_and_a_failed_concurrent_load_frees_its_share(tmp_path):
    gpu = FakeGpu(40 * GIB, total=80 * GIB)
    loads = SlowLoads(gpu)
    ledger = lambda: GpuMemoryLedger(0, str(tmp_path), free=gpu)  # noqa: E731
    # Two copies with no figure yet: each loads alone, so what it took is its own.
    assert _at_once(lambda: loads.load(ledger(), takes=4 * GIB), lambda: loads.load(ledger(), takes=4 * GIB)) \
        == [None, None]
    assert loads.most_inside == 1
    assert json.loads(open(ledger().path).read())["model-a"]["bytes"] == 4 * GIB

    def failing():
        with ledger().loading("model-a", "x"):
            raise RuntimeError("the engine failed to load")

    # A failed load leaves no share behind: the next copies still load side by side.
    assert isinstance(_at_once(failing)[0], RuntimeError)
    assert _at_once(*[lambda: loads.load(ledger(), takes=4 * GIB)] * 3) == [None, None, None]
    assert loads.most_inside == 3


def test_a_load_left_registered_by_a_process_that_died_is_not_waited_for(tmp_path):
    from engines.gpu_memory import _pid_namespace
    import subprocess
    import sys
    import time

    if not _pid_namespace():
        pytest.skip("no /proc/self/ns/pid here: registrations age out after LOAD_MAX_S instead")
    gpu = FakeGpu(30 * GIB)
    ledger = GpuMemoryLedger(0, str(tmp_path), free=gpu)
    _load(ledger, gpu, takes=GIB)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = json.loads(open(ledger.path).read())
    record["loading"] = {"loads": {"x": {"bytes": 40 * GIB, "pid": int(dead.stdout), "pid_namespace": _pid_namespace(),
                                         "at": time.time()}}}
    open(ledger.path, "w").write(json.dumps(record))
    start = time.monotonic()
    _load(ledger, gpu, takes=GIB)  # a dead process's 40 GiB share would refuse it, or make it wait
    assert time.monotonic() - start < 5
