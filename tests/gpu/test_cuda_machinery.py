"""The CUDA side of the TensorRT runner, for real on a GPU: buffers, pinned memory, streams, overlap.

A CuPy kernel stands in for TensorRT's ``execute_async_v3`` (tests/gpu/cupy_standin.py);
everything else is the project's code running on the device: ExecutionSlot/SlotPool and
TensorRTEngine's profile choice, splitting and thread handling with real cudaMalloc'd
buffers, cudaMallocHost'd pinned buffers, non-blocking streams and CUDA graphs.
Needs a CUDA GPU, cuda-python and CuPy; not TensorRT.

    python -m pytest tests/gpu/test_cuda_machinery.py -v -s
"""

import threading
import time

import numpy as np
import pytest

from engines.base import EngineError


def _cuda_ready():
    try:
        import cupy  # noqa: F401
        from cuda.bindings import runtime as rt
    except ImportError as e:
        return f"needs CuPy and cuda-python (cuda-bindings): {e}"
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count < 1:
        return f"needs a CUDA GPU (cudaGetDeviceCount: {err}, {count})"
    return None


REASON = _cuda_ready()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

D = 4096  # bytes per sample in, D // 16 floats + D ints out


@pytest.fixture(scope="module")
def standin_cls():
    from tests.gpu import cupy_standin

    return cupy_standin


def make_slots(standin, n, max_rows, graphs=False):
    from engines.tensorrt.buffers import ExecutionSlot, TensorLayout

    inputs = [TensorLayout("x", np.uint8, max_rows * D)]
    outputs = [TensorLayout("y", np.float32, max_rows * (D // 16) * 4), TensorLayout("z", np.int32, max_rows * D * 4)]
    return [ExecutionSlot(inputs, outputs, lambda stream, shapes: standin.output_shapes(shapes), standin.enqueue,
                          cuda_graphs=graphs, name=f"slot{i}") for i in range(n)]


def batch(rows, seed=0, d=D):
    return np.random.default_rng(seed).integers(0, 256, size=(rows, d), dtype=np.uint8)


def check(out, x):
    want = __import__("tests.gpu.cupy_standin", fromlist=["reference"]).reference(x)
    np.testing.assert_array_equal(out["y"], want["y"])
    np.testing.assert_array_equal(out["z"], want["z"])


def is_pinned(ptr: int) -> bool:
    """True when ``ptr`` is page-locked host memory known to CUDA."""
    from engines import cuda

    rt = cuda.cudart()
    err, attrs = rt.cudaPointerGetAttributes(ptr)
    if err != rt.cudaError_t.cudaSuccess:
        rt.cudaGetLastError()  # clear the sticky-free error an unknown pointer leaves
        return False
    return attrs.type == rt.cudaMemoryType.cudaMemoryTypeHost


def test_device_info_and_errors():
    from engines import cuda

    info = cuda.device_info(0)
    print(f"\nGPU 0: {info.name}, compute {info.compute_capability}, {info.total_memory / 2**30:.0f} GiB")
    assert info.major >= 7 and info.name
    with pytest.raises(EngineError, match=r"GPU 99 does not exist: \d+ GPU\(s\) are visible"):
        cuda.device_info(99)


def test_pinned_and_device_buffers_are_what_they_claim(standin_cls):
    from engines import cuda

    rt = cuda.cudart()
    slot = make_slots(standin_cls.StandIn(D), 1, 8)[0]
    try:
        for name, buf in slot.host_buffers.items():
            assert is_pinned(buf.ptr), name
            err, flags = rt.cudaHostGetFlags(buf.ptr)
            assert err == rt.cudaError_t.cudaSuccess, (name, err)
        for name, buf in slot.device_buffers.items():
            err, attrs = rt.cudaPointerGetAttributes(buf.ptr)
            assert err == rt.cudaError_t.cudaSuccess and attrs.type == rt.cudaMemoryType.cudaMemoryTypeDevice
        pageable = np.zeros(1 << 20, np.uint8)
        assert not is_pinned(pageable.ctypes.data)
    finally:
        slot.close()


def test_slots_dynamic_batches_in_order(standin_cls):
    from engines.tensorrt.buffers import SlotPool

    standin = standin_cls.StandIn(D)
    pool = SlotPool(make_slots(standin, 2, 128))
    try:
        sizes = [1, 7, 128, 63, 128, 5, 2, 100]
        feeds = [{"x": batch(n, seed=n)} for n in sizes]
        outs = list(pool.run(feeds))
        for f, out in zip(feeds, outs):
            assert out["y"].shape == (len(f["x"]), D // 16)
            check(out, f["x"])
        with pytest.raises(EngineError, match=r"Input tensor: x \| shape \(129, 4096\) needs 528384 bytes"):
            list(pool.run([{"x": batch(129)}]))
        check(next(iter(pool.run([{"x": batch(3, seed=9)}], depth=1))), batch(3, seed=9))  # the pool recovered
        assert pool._free.qsize() == 2
    finally:
        pool.close()


def test_engine_with_standin_splits_and_chooses_profiles(standin_cls, monkeypatch):
    """TensorRTEngine's own code on real CUDA: profile choice, splitting, short last batch, threads."""
    from engines.tensorrt import deserialize, runtime
    from tests.tensorrt_fakes import plan_bytes

    standin = standin_cls.StandIn(D)
    monkeypatch.setattr(deserialize, "import_tensorrt",
                        lambda lean_ok=False: standin_cls.module(standin, [(1, 8, 16), (17, 64, 64)]))
    with runtime.TensorRTEngine(plan_bytes(10, 11, 0, 33), num_contexts=3) as engine:
        assert engine.max_batch_size == 64 and engine.profiles == [(1, 8, 16), (17, 64, 64)]
        for n in (1, 16, 17, 64, 65, 150, 200):  # 150 = 64 + 64 + 22; 200 = 64 * 3 + 8
            x = batch(n, seed=n)
            check(engine.infer({"x": x}), x)
        outs = list(engine.infer_many({"x": batch(n, seed=n)} for n in (5, 130, 3)))
        for n, out in zip((5, 130, 3), outs):
            check(out, batch(n, seed=n))
        errors = []

        def work(k):
            try:
                for i in range(10):
                    x = batch(1 + (k * 13 + i * 7) % 150, seed=k * 10 + i)
                    check(engine.infer({"x": x}), x)
            except Exception as e:  # asserted below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert errors == []
        print(f"\nengine stand-in: {engine.describe()['enqueues']}")


def test_engine_reads_device_inputs_without_a_host_round_trip(standin_cls, monkeypatch):
    """On real CUDA: CuPy arrays in, device-to-device copies only (padding and splitting on
    the device), and only the requested outputs copied to the host."""
    import collections

    import cupy

    from engines import cuda
    from engines.tensorrt import deserialize, runtime
    from engines.tensorrt.shapes import split_points
    from tests.gpu.cupy_standin import reference
    from tests.tensorrt_fakes import plan_bytes

    standin = standin_cls.StandIn(D)
    monkeypatch.setattr(deserialize, "import_tensorrt",
                        lambda lean_ok=False: standin_cls.module(standin, [(4, 8, 16), (17, 32, 64)]))
    calls = collections.Counter()
    for kind in ("h2d", "d2h", "d2d"):
        real = getattr(cuda, f"copy_{kind}_async")

        def counted(*args, _real=real, _kind=kind):
            calls[_kind] += 1
            return _real(*args)

        monkeypatch.setattr(cuda, f"copy_{kind}_async", counted)
    with runtime.TensorRTEngine(plan_bytes(10, 11, 0, 33), num_contexts=2) as engine:
        for n in (2, 16, 17, 64, 150):  # 2 padded to 4 on the device; 150 = 64 + 64 + 22
            x = batch(n, seed=n)
            chunks = split_points(n, engine.layout.ranges)
            calls.clear()
            out = engine.infer({"x": cupy.asarray(x)}, outputs=["y"])
            assert list(out) == ["y"] and out["y"].shape == (n, D // 16)
            np.testing.assert_array_equal(out["y"], reference(x)["y"])
            assert calls["h2d"] == 0, calls
            assert calls["d2h"] == len(chunks), calls  # y only, once per chunk
            assert calls["d2d"] == len(chunks) + sum(c.pad for c in chunks), calls
        # Written on another (non-blocking) stream: the slot's stream must wait for it (CUDA array
        # interface v3 "stream"); a large batch makes a missing wait likely to read unwritten memory.
        producer = cupy.cuda.Stream(non_blocking=True)
        for seed in range(3):
            x = batch(64, seed=100 + seed)
            with producer:
                x_dev = cupy.asarray(x)
                x_dev = (x_dev.astype(cupy.int32) + 0).astype(cupy.uint8)  # more work on the producer stream
                out = engine.infer({"x": x_dev})
            check(out, x)
        outs = list(engine.infer_many([{"x": cupy.asarray(batch(n, seed=n))} for n in (5, 130, 3)], outputs=["z"]))
        for n, out in zip((5, 130, 3), outs):
            np.testing.assert_array_equal(out["z"], reference(batch(n, seed=n))["z"])
        print(f"\ndevice inputs: {engine.describe()['enqueues']}")


def test_cuda_graphs_capture_and_replay(standin_cls, monkeypatch):
    from engines.tensorrt import deserialize, runtime
    from tests.tensorrt_fakes import plan_bytes

    standin = standin_cls.StandIn(D)
    monkeypatch.setattr(deserialize, "import_tensorrt", lambda lean_ok=False: standin_cls.module(standin, [(1, 8, 32)]))
    with runtime.TensorRTEngine(plan_bytes(10, 11, 0, 33), num_contexts=1, cuda_graphs=True) as engine:
        for i in range(4):
            for n in (8, 8, 3, 3):
                x = batch(n, seed=i * 10 + n)
                check(engine.infer({"x": x}), x)
        counts = engine.describe()["enqueues"]
        print(f"\ncuda graphs: {counts}, kernel launches outside graphs {standin.launches}")
        # A graph replays only right after a plain enqueue of the same shape on that context: the
        # first batch after a shape change is enqueued plainly, the second replays.
        assert counts == {"enqueue": 8, "captured": 2, "graph_launch": 8}


def _timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_copies_and_compute_of_consecutive_batches_overlap(standin_cls):
    """Serial (one batch in flight) vs pipelined (three in flight) on the same slots and work."""
    from engines import cuda
    from engines.tensorrt.buffers import SlotPool

    d = 1 << 16
    rows = 256  # 16 MiB in, 1 MiB + 64 MiB out per batch
    standin = standin_cls.StandIn(d, iters=1)
    from engines.tensorrt.buffers import ExecutionSlot, TensorLayout

    # Only y comes back: z stays on the device (its D2H would dominate and hide the effect).
    inputs = [TensorLayout("x", np.uint8, rows * d)]
    outputs = [TensorLayout("y", np.float32, rows * (d // 16) * 4)]
    z = cuda.DeviceBuffer(rows * d * 4)

    def enqueue(stream, shapes, addresses):
        standin.enqueue(stream, shapes, dict(addresses, z=z.ptr))

    slots = [ExecutionSlot(inputs, outputs, lambda s, shapes: {"y": standin.output_shapes(shapes)["y"]}, enqueue,
                           name=f"slot{i}") for i in range(3)]
    pool = SlotPool(slots)
    feeds = [{"x": batch(rows, seed=i, d=d)} for i in range(12)]
    try:
        # Correctness first, outside the timed runs.
        for f, out in zip(feeds, pool.run(feeds, depth=3)):
            check_y(out, f)
        # Calibrate the stand-in's compute to about the host staging + copy time of one batch, so
        # overlapping them can show (with no overlap the pipelined run is no faster).
        stream = slots[0].stream
        rt = cuda.cudart()
        start, stop = rt.cudaEventCreate()[1], rt.cudaEventCreate()[1]

        def gpu_ms(fn):
            cuda.check(rt.cudaEventRecord(start, stream.handle), "cudaEventRecord")
            fn()
            cuda.check(rt.cudaEventRecord(stop, stream.handle), "cudaEventRecord")
            stream.synchronize()
            return cuda.check(rt.cudaEventElapsedTime(start, stop), "cudaEventElapsedTime")

        shapes = {"x": (rows, d)}
        host = _timed(lambda: np.copyto(slots[0].host_buffers["x"].view(np.uint8, (rows, d)), feeds[0]["x"])) * 1e3
        h2d = gpu_ms(lambda: cuda.copy_h2d_async(slots[0].device_buffers["x"].ptr, slots[0].host_buffers["x"].ptr,
                                                 rows * d, stream))
        for iters in (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536):
            standin.iters = iters
            compute = gpu_ms(lambda: enqueue(stream.ptr, shapes, slots[0].addresses))
            if compute >= host + h2d:
                break
        consume = lambda depth: list(pool.run(feeds, depth=depth))  # noqa: E731
        consume(3)
        serial = _timed(lambda: consume(1))
        pipelined = _timed(lambda: consume(3))
        threaded = _timed(lambda: _threads(pool, feeds, 3))
        print(f"\noverlap: per batch host staging {host:.2f} ms, H2D {h2d:.2f} ms, compute {compute:.2f} ms "
              f"(iters {standin.iters}); {len(feeds)} batches: serial {serial * 1e3:.1f} ms, pipelined (3 in flight) "
              f"{pipelined * 1e3:.1f} ms, 3 threads {threaded * 1e3:.1f} ms; pipelined/serial = "
              f"{pipelined / serial:.2f}, threads/serial = {threaded / serial:.2f}")
        assert pipelined < 0.9 * serial
        assert threaded < 0.95 * serial
    finally:
        pool.close()
        z.free()


def check_y(out, f):
    x = f["x"]
    want = x.reshape(x.shape[0], -1, 16).astype(np.float32).sum(-1) * 2 + 1
    np.testing.assert_array_equal(out["y"], want)


def _threads(pool, feeds, n):
    errors = []

    def work(part):
        try:
            for f in part:
                next(iter(pool.run([f], depth=1)))
        except Exception as e:  # asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(feeds[i::n],)) for i in range(n)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
