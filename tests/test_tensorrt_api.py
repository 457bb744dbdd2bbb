"""The TensorRT API our code touches is the real one, and the glue around it works.

1. Every TensorRT attribute the code uses is collected from the source (ast) and must
   be declared below; runtime names must exist in the real lean runtime module
   (``tensorrt_lean``, pip tensorrt-lean-cu13) and every name in the symbol tables of
   the full 10.16 and 11.4 bindings (tests/data/tensorrt-symbols, with how to regenerate them).
2. Nothing removed in TensorRT 10.0 or 11.0 is used, and 10.x-only names are used only
   under a version guard.
3. The builder and runtime code paths run against fakes of that same API (no GPU here),
   checking results, profile handling, splitting and error messages.
"""

import ast
import dataclasses
import gc
import io
import logging
import pickle
import re
import sys
import threading
import tokenize
from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.base import EngineError
from engines.tensorrt import _trt, builder as builder_mod, deserialize as deserialize_mod, layout as layout_mod
from engines.tensorrt import runtime as runtime_mod
from engines.tensorrt.options import BuildOptions, Profile
from engines.tensorrt.plan import PlanInfo
from tests import tensorrt_fakes as fakes
from tests.tensorrt_models import LABELS, image_classifier, two_in_two_out

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "engines" / "tensorrt"
SYMBOLS = REPO / "tests" / "data" / "tensorrt-symbols"

# Names used on TensorRT objects, by the lean runtime class that must have them.
RUNTIME_API = {
    "module": {"Runtime", "ILogger", "TensorIOMode", "__version__"},
    "ILogger": {"Severity", "log"},
    "TensorIOMode": {"INPUT"},
    "Runtime": {"deserialize_cuda_engine", "engine_host_code_allowed"},
    "ICudaEngine": {"num_io_tensors", "get_tensor_name", "is_shape_inference_io", "get_tensor_dtype",
                    "get_tensor_shape", "get_tensor_mode", "get_tensor_profile_shape", "num_optimization_profiles",
                    "create_execution_context"},
    "IExecutionContext": {"set_optimization_profile_async", "set_input_shape", "infer_shapes", "get_tensor_shape",
                          "set_tensor_address", "execute_async_v3"},
}
# Builder-side names (not in the lean runtime): checked against the full bindings' symbol tables.
BUILDER_API = {
    "Builder", "OnnxParser", "create_network", "parse", "num_errors", "get_error", "desc", "code", "node",
    "node_name", "node_operator", "create_builder_config", "set_memory_pool_limit", "MemoryPoolType", "WORKSPACE",
    "builder_optimization_level", "set_flag", "BuilderFlag", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME",
    "hardware_compatibility_level", "HardwareCompatibilityLevel", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY",
    "num_inputs", "get_input", "shape", "name", "create_optimization_profile", "set_shape",
    "add_optimization_profile", "create_timing_cache", "set_timing_cache", "get_timing_cache", "serialize", "combine",
    "build_serialized_network", "ILogger", "Severity",
}
#: Only in 10.x (removed in 11.0): allowed only inside ``if ... major == 10`` branches.
TEN_ONLY = {"FP16", "EXPLICIT_BATCH"}

# Roots of attribute chains that are TensorRT objects in our source.
TRT_ROOTS = {"trt", "builder", "network", "parser", "config", "trt_profile", "tensor", "err", "engine", "ctx",
             "runtime", "cache", "prev"}
#: Attributes of our own holders that are TensorRT objects: ``self.context``, ``loaded.engine``, ``net.parser``...
TRT_HOLDER_ATTRS = {"self": {"context"}, "loaded": {"engine", "runtime"}, "net": {"builder", "network", "parser"}}


def _chain_root(node):
    """(root name, attribute names from the root outward) of an expression like a.b().c."""
    names = []
    while True:
        if isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Call):
            node = node.func
        elif isinstance(node, ast.Subscript):
            node = node.value
        else:
            break
    return (node.id if isinstance(node, ast.Name) else None), list(reversed(names))


def used_trt_names():
    """Attribute names used on TensorRT objects in engines/tensorrt, by file."""
    used = {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            root, chain = _chain_root(node)
            if root in TRT_HOLDER_ATTRS and chain and chain[0] in TRT_HOLDER_ATTRS[root]:
                names.update(chain[1:])
            elif root in TRT_ROOTS:
                names.update(chain)
        # Only the outermost chains matter; inner nodes add their prefixes, which are in chain anyway.
        used[path.name] = names
    return used


def symbols(version):
    path = SYMBOLS / f"{version}.txt"
    # Part of the repository: a missing table is a broken checkout, never a reason to skip.
    return set(path.read_text().split())


#: Names we use that the tables hold only as the tail of a longer string: the linker stores a
#: string that ends another one only once (tail merging), so e.g. "serialize" is inside
#: "plugins_to_serialize". Each maps to the symbol it is merged into, which must be in the table.
#: Keep this list explicit: any other name must be in the table exactly.
TAIL_MERGED = {
    "Builder": "IExprBuilder",
    "Runtime": "IPluginV3OneRuntime",
    "INPUT": "CONDITIONAL_INPUT",
    "num_errors": "get_num_errors",
    "desc": "get_error_desc",
    "code": "get_error_code",
    "serialize": "plugins_to_serialize",
    "shape": "get_shape",
    "name": "get_tensor_name",
}


def in_table(name, table):
    """``name`` is in a symbol table exactly, or is a known tail-merged name whose host symbol is."""
    if name in table:
        return True
    host = TAIL_MERGED.get(name)
    return host is not None and host.endswith(name) and host in table


# -- 1. the names are real ----------------------------------------------------------------

def test_every_trt_name_in_the_source_is_declared():
    used = set().union(*used_trt_names().values())
    used -= {"__version__", "__init__"}
    # Looked up by name (getattr) so that a level missing from an older TensorRT is a clear error.
    used |= {member for member, _ in builder_mod.HARDWARE_LEVELS.values()}
    declared = set().union(*RUNTIME_API.values()) | BUILDER_API | TEN_ONLY
    unknown = used - declared
    assert not unknown, f"TensorRT names used but not declared in this test (check them, then add): {unknown}"
    assert declared - used == {"log", "EXPLICIT_BATCH", "__version__"}  # log: ours to override; no EXPLICIT_BATCH


def test_runtime_names_exist_in_the_real_lean_runtime():
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    classes = {"module": lean, "ILogger": lean.ILogger, "TensorIOMode": lean.TensorIOMode, "Runtime": lean.Runtime,
               "ICudaEngine": lean.ICudaEngine, "IExecutionContext": lean.IExecutionContext}
    missing = [f"{cls}.{name}" for cls, names in RUNTIME_API.items() for name in names
               if not hasattr(classes[cls], name)]
    assert not missing, missing
    assert list(lean.ILogger.Severity.__members__) == ["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"]
    assert set(layout_mod.DTYPES) <= set(lean.DataType.__members__)


def test_all_names_exist_in_the_full_bindings_symbol_tables():
    t10, t11 = symbols("10.16"), symbols("11.4")
    names = (set().union(*RUNTIME_API.values()) | BUILDER_API) - {"__version__", "log"}  # log: ours to override
    missing = {v: sorted(n for n in names if not in_table(n, t)) for v, t in (("10.16", t10), ("11.4", t11))}
    assert missing == {"10.16": [], "11.4": []}
    assert all(in_table(n, t10) for n in TEN_ONLY)
    assert not any(n in t11 for n in TEN_ONLY), "expected EXPLICIT_BATCH and FP16 to be gone in 11.x"


def test_the_symbol_check_can_fail():
    t11 = symbols("11.4")
    for removed in ("num_bindings", "execute_async_v2", "get_binding_shape", "max_workspace_size", "build_engine"):
        assert not in_table(removed, t11)
    # Tails of real symbols that are not names themselves are refused unless listed in TAIL_MERGED.
    for tail in ("profile_shape", "_name", "error_code", "ExprBuilder"):
        assert any(entry.endswith(tail) for entry in t11) and not in_table(tail, t11), tail


def test_tail_merged_names_are_used_and_only_tail_merged():
    names = set().union(*RUNTIME_API.values()) | BUILDER_API
    assert set(TAIL_MERGED) <= names, f"stale TAIL_MERGED entries: {set(TAIL_MERGED) - names}"
    for version in ("10.16", "11.4"):
        table = symbols(version)
        for name, host in TAIL_MERGED.items():
            assert name not in table, f"{name} is in the {version} table exactly: drop it from TAIL_MERGED"
            assert host in table and host.endswith(name), (version, name, host)


def test_fakes_only_use_real_names():
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    public = lambda cls: {n for n in vars(cls) if not n.startswith("_")}
    assert public(fakes.FakeEngine) - {"profiles", "contexts", "executed", "fail_execute", "cuda", "logger"} \
        <= set(dir(lean.ICudaEngine))
    assert public(fakes.FakeContext) - {"engine", "profile", "shapes", "addresses", "calls"} \
        <= set(dir(lean.IExecutionContext))


# -- 2. nothing removed is used ---------------------------------------------------------------

REMOVED = [r"\bnum_bindings\b", r"\bget_binding_\w+", r"\bbinding_is_input\b", r"\bexecute_async_v2\b",
           r"\bset_binding_shape\b", r"\.build_engine\(", r"\bmax_workspace_size\b", r"\bget_profile_shape\(",
           r"\bcreate_execution_context_without_device_memory\b", r"\bdevice_memory_size\b(?!_v2)",
           r"TacticSource\.(CUBLAS|CUBLAS_LT|CUDNN)\b", r"BuilderFlag\.(INT8|BF16|FP8)\b", r"int8_calibrator",
           r"from cuda import cuda\b", r"\bpycuda\b", r"\bimport tensorrt\b"]


def code_only(path):
    """The source without comments and string literals (docstrings may name old APIs)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in tokens if t.type not in (tokenize.COMMENT, tokenize.STRING))


def scanned_files():
    return sorted(p for folder in ("engines", "images", "model_tools") for p in (REPO / folder).rglob("*.py"))


def test_no_api_removed_in_10_or_11_is_used():
    hits = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in scanned_files() for pattern in REMOVED
            for m in re.finditer(pattern, code_only(p))]
    assert not hits, hits


def test_the_removed_api_scan_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("n = engine.num_bindings  # old\nctx.execute_async_v2(bindings, stream)\n'''num_bindings'''\n")
    text = code_only(bad)
    assert [p for p in REMOVED if re.search(p, text)] == [r"\bnum_bindings\b", r"\bexecute_async_v2\b"]


def _guarded_by_major_10(parents, node):
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.If) and node in parent.body:
            text = ast.unparse(parent.test)
            if re.search(r"\bmajor\s*==\s*10\b", text):
                return True
        node = parent
    return False


def test_ten_only_names_are_behind_a_version_guard():
    uses = 0
    for path in scanned_files():
        tree = ast.parse(path.read_text())
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in TEN_ONLY:
                uses += 1
                assert _guarded_by_major_10(parents, node), f"{path.name}:{node.lineno} {node.attr} outside 10.x"
    assert uses == 1  # BuilderFlag.FP16 in builder.py


def test_importing_the_package_imports_no_heavy_module():
    code = ("import sys, engines.tensorrt, model_tools.build, model_tools.validate;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorrt', 'tensorrt_lean', 'cuda', 'cupy', 'onnxruntime', 'apache_beam')))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


# -- import helper and logger, with the real lean module ------------------------------------------

def test_import_tensorrt_falls_back_to_lean_and_names_the_fix(monkeypatch):
    pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # what `import tensorrt` sees when it is absent
    trt = _trt.import_tensorrt(lean_ok=True)
    assert trt.__name__ == "tensorrt_lean" and _trt.is_lean(trt) and _trt.version_tuple(trt)[0] in (10, 11)
    with pytest.raises(ImportError, match=r"TensorRT is not importable .*needed: tensorrt\. Use the image built "
                                          r"from Dockerfile .*or pip install tensorrt"):
        _trt.import_tensorrt(lean_ok=False)
    monkeypatch.setitem(sys.modules, "tensorrt_lean", None)
    with pytest.raises(ImportError, match="needed: tensorrt or tensorrt_lean"):
        _trt.import_tensorrt(lean_ok=True)


def test_capturing_logger_on_the_real_ilogger(monkeypatch):
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    monkeypatch.setattr(_trt, "_LOGGERS", {})  # a fresh process-wide logger for this test
    logger = _trt.capturing_logger(lean, "WARNING")
    assert isinstance(logger, lean.ILogger)
    logger.log(lean.ILogger.Severity.ERROR, "expecting compute 8.9 got compute 9.0")
    logger.log(lean.ILogger.Severity.INFO, "chatty")
    assert logger.messages == [("ERROR", "expecting compute 8.9 got compute 9.0")]
    assert logger.text() == "[ERROR] expecting compute 8.9 got compute 9.0"
    with pytest.raises(EngineError, match="min_severity must be one of"):
        _trt.capturing_logger(lean, "LOUD")


def test_unsupported_major_is_refused(monkeypatch):
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1.6", __name__="tensorrt"))
    with pytest.raises(EngineError, match=r"tensorrt 8.6.1.6 is not supported; this project needs TensorRT 10.x "
                                          r"or 11.x"):
        _trt.import_tensorrt()


def test_load_without_gpu_fails_cleanly_before_the_runtime():
    """Real lean runtime + real cuda-python on this GPU-less machine: a clear error, no segfault."""
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python (cuda-bindings) is not installed")
    from engines import cuda

    if cuda.cudart().cudaGetDeviceCount()[0] == cuda.cudart().cudaError_t.cudaSuccess:
        pytest.skip("a CUDA GPU is present; this checks the no-GPU path")
    major, minor = _trt.version_tuple(lean)[:2]
    with pytest.raises(EngineError, match=r"No CUDA GPU is usable here \(cudaGetDeviceCount: cudaError"):
        runtime_mod.TensorRTEngine(fakes.plan_bytes(major, minor, 0, 0))


# -- 3. runtime glue against fakes ----------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    return fakes.FakeCuda().install(monkeypatch)


def make_engine(monkeypatch, fake_gpu, plan=None, **kw):
    trt_kw = {k: kw.pop(k) for k in ("profiles", "deserialize_ok", "version", "module_name", "needs_host_code",
                                     "deserialize_error") if k in kw}
    trt = fakes.fake_tensorrt(fake_gpu, **trt_kw)
    monkeypatch.setattr(deserialize_mod, "import_tensorrt", lambda lean_ok=False: trt)
    version = [int(x) for x in trt.__version__.split(".")]
    return runtime_mod.TensorRTEngine(plan or fakes.plan_bytes(*version), **kw), trt


def feed(n, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(n, 4)).astype(np.float32) * 10,
            "b": rng.integers(-10, 10, size=(n, 4)).astype(np.int32)}


def check(outputs, f):
    np.testing.assert_array_equal(outputs["sum"], f["a"] + f["b"].astype(np.float32))
    np.testing.assert_array_equal(outputs["flag"], f["a"] > f["b"])
    assert outputs["sum"].dtype == np.float32 and outputs["flag"].dtype == np.bool_


def test_engine_specs_profiles_and_buffers(monkeypatch, fake_gpu):
    engine, trt = make_engine(monkeypatch, fake_gpu, num_contexts=3)
    with engine:
        assert {n: s.describe() for n, s in engine.input_specs.items()} == {"a": "a: float32[N, 4]",
                                                                             "b": "b: int32[N, 4]"}
        assert {n: s.describe() for n, s in engine.output_specs.items()} == {"sum": "sum: float32[N, 4]",
                                                                              "flag": "flag: bool[N, 4]"}
        assert engine.profiles == [(1, 2, 4), (5, 8, 16)]
        assert engine.max_batch_size == 16
        assert [len(e.contexts) for e in trt.state.engines] == [3]  # one engine, every context on it
        slot = engine._pool.slots[0]
        assert {n: b.nbytes for n, b in slot.device_buffers.items()} == {"a": 256, "b": 256, "sum": 256, "flag": 64}
        assert trt.state.runtimes[0].engine_host_code_allowed is False
    assert not fake_gpu.memory  # close() freed every buffer


@pytest.mark.parametrize("contexts", [1, 2, 3])
def test_every_context_runs_on_one_engine_and_selects_the_covering_profile(monkeypatch, fake_gpu, contexts):
    """The plan holds each profile once and contexts share it (TensorRT 9+);
    the plan is deserialized once, whatever the number of contexts."""
    engine, trt = make_engine(monkeypatch, fake_gpu, num_contexts=contexts)
    with engine:
        assert engine.profiles == [(1, 2, 4), (5, 8, 16)]
        assert trt.state.deserialize_calls == 1 and len(trt.state.engines) == 1
        fake_engine = trt.state.engines[0]
        assert len(fake_engine.contexts) == contexts == engine.describe()["contexts"] == engine.concurrent_calls()
        feeds = [feed(n, seed=n) for n in (3, 9, 2, 16, 1, 12, 10, 11)]  # both profiles, on every context
        for f, out in zip(feeds, engine.infer_many(feeds)):
            check(out, f)
        # The last batches (12, 10, 11) all use profile 1, on whichever contexts ran them, at once.
        assert all(ctx.profile == 1 for ctx in fake_engine.contexts)


def test_infer_picks_profiles_and_splits_large_batches(monkeypatch, fake_gpu):
    engine, trt = make_engine(monkeypatch, fake_gpu, num_contexts=2)
    with engine:
        for n in (1, 3, 4, 5, 16, 17, 40):
            f = feed(n, seed=n)
            check(engine.infer(f), f)
        fake_engine = trt.state.engines[0]
        # 40 = 16 + 16 + 8; 17 = 16 + 1: chunks within profiles, never above 16.
        assert fake_engine.executed[-5:] == [16, 1, 16, 16, 8]
        calls = [c for ctx in fake_engine.contexts for c in ctx.calls]
        assert "profile 1" in calls and "profile 0" in calls
        out = engine.infer(feed(0))
        assert out["sum"].shape == (0, 4)


def test_infer_pads_short_chunks_and_refuses_bad_feeds_before_enqueue(monkeypatch, fake_gpu):
    engine, trt = make_engine(monkeypatch, fake_gpu, profiles=((4, 8, 16),))
    executed = trt.state.engines[0].executed
    with engine:
        # 2 < min 4: run as 4 (the last example repeated), return 2 rows.
        f = feed(2)
        out = engine.infer(f)
        check(out, f)
        assert out["sum"].shape == (2, 4) and executed == [4]
        # 18 = 16 + 2 would leave 2 < min 4: split evenly instead.
        f = feed(18)
        check(engine.infer(f), f)
        assert executed == [4, 9, 9]
        with pytest.raises(EngineError, match=r"Input tensor: b \| Received unexpected dtype: int64"):
            engine.infer({"a": f["a"], "b": f["b"].astype(np.int64)})
        assert executed == [4, 9, 9]  # nothing was enqueued for refused feeds


def test_split_chunks_never_fall_below_the_profile_min(monkeypatch, fake_gpu):
    # 160 split evenly is 80 + 80, both below min 100: run 150, then 10 padded to 100.
    engine, trt = make_engine(monkeypatch, fake_gpu, profiles=((100, 120, 150),))
    with engine:
        f = feed(160)
        check(engine.infer(f), f)
        assert trt.state.engines[0].executed == [150, 100]
        for f, out in zip([feed(160, seed=1), feed(7, seed=2)], engine.infer_many([feed(160, seed=1),
                                                                                   feed(7, seed=2)])):
            check(out, f)


def test_a_plan_whose_profiles_leave_a_gap_is_refused_at_load(monkeypatch, fake_gpu):
    with pytest.raises(EngineError, match=r"profiles leave a gap: profile 0 \(batch 1..16\) ends at batch 16 and "
                                          r"profile 1 \(batch 64..256\) starts at 64, so batches 17..63 fit no "
                                          r"profile"):
        make_engine(monkeypatch, fake_gpu, profiles=((1, 8, 16), (64, 128, 256)))
    assert not fake_gpu.memory


def test_infer_from_many_threads(monkeypatch, fake_gpu):
    engine, _ = make_engine(monkeypatch, fake_gpu, num_contexts=3)
    errors = []

    def work(seed):
        try:
            for i in range(20):
                f = feed(1 + (seed * 7 + i) % 40, seed=seed * 100 + i)
                check(engine.infer(f), f)
        except Exception as e:  # collected and asserted below
            errors.append(e)

    with engine:
        threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert engine._pool._free.qsize() == 3  # every slot came back


def test_infer_many_keeps_order(monkeypatch, fake_gpu):
    engine, _ = make_engine(monkeypatch, fake_gpu, num_contexts=2)
    feeds = [feed(n, seed=n) for n in (3, 20, 1, 16, 7)]
    with engine:
        outs = list(engine.infer_many(iter(feeds)))
    assert len(outs) == 5
    for f, out in zip(feeds, outs):
        check(out, f)


def test_cuda_graphs_capture_once_per_shape_and_fall_back(monkeypatch, fake_gpu):
    engine, trt = make_engine(monkeypatch, fake_gpu, num_contexts=1, cuda_graphs=True)
    with engine:
        for _ in range(3):
            f = feed(3)
            check(engine.infer(f), f)
        f = feed(5)
        check(engine.infer(f), f)
        counts = engine.describe()["enqueues"]
        assert counts == {"enqueue": 2, "captured": 2, "graph_launch": 2}
    fake_gpu.graphs_work = False
    engine, _ = make_engine(monkeypatch, fake_gpu, num_contexts=1, cuda_graphs=True)
    with engine:
        for _ in range(2):
            f = feed(3)
            check(engine.infer(f), f)
        assert engine.describe()["enqueues"] == {"enqueue": 2, "capture_failed": 1}


def test_cuda_graph_replays_only_after_the_same_shapes(monkeypatch, fake_gpu):
    """A graph is valid for one (context, profile, shapes, addresses): after another shape ran on the
    context, a plain enqueue re-applies the shapes before the graph may replay (the fake graph, like a
    real one, replays kernels only, without execute_async_v3's per-shape setup)."""
    engine, trt = make_engine(monkeypatch, fake_gpu, profiles=((1, 8, 16),), num_contexts=1, cuda_graphs=True)
    with engine:
        for i, n in enumerate((8, 3, 8, 3, 8, 8)):
            f = feed(n, seed=i)
            check(engine.infer(f), f)
        counts = engine.describe()["enqueues"]
    # 8: enqueue + capture; 3: enqueue + capture; 8: enqueue (3 ran last); 3: enqueue; 8: enqueue; 8: launch.
    assert counts == {"enqueue": 5, "captured": 2, "graph_launch": 1}


def test_graph_capture_follows_a_synchronized_plain_run(monkeypatch, fake_gpu):
    engine, _ = make_engine(monkeypatch, fake_gpu, num_contexts=1, cuda_graphs=True)
    with engine:
        fake_gpu.events.clear()
        engine.infer(feed(3))
    assert fake_gpu.events[:2] == ["sync", "capture"]  # docs/tensorrt.md: enqueue once, synchronize, then capture


def test_graph_capture_failure_is_logged_with_its_reason(monkeypatch, caplog):
    from engines import cuda

    monkeypatch.setattr(cuda, "_cudart", fakes.FakeCudart())
    stream = cuda.Stream()

    def enqueue():
        raise EngineError("execute_async_v3 failed: [ERROR] capture not supported")

    with caplog.at_level(logging.WARNING, logger="engines.cuda"):
        assert cuda.capture_graph(stream, enqueue) is None
        assert cuda.capture_graph(stream, lambda: None) is None
    assert [r.getMessage() for r in caplog.records] == [
        "CUDA graph capture: the enqueue raised EngineError: execute_async_v3 failed: [ERROR] capture not supported",
        "CUDA graph capture: cudaStreamEndCapture failed with cudaErrorStreamCaptureInvalidated: operation failed "
        "due to a previous error during capture"]
    stream.destroy()


def test_cuda_resources_are_freed_when_collected(monkeypatch):
    from engines import cuda

    rt = fakes.FakeCudart()
    monkeypatch.setattr(cuda, "_cudart", rt)
    dev, host, stream = cuda.DeviceBuffer(64), cuda.PinnedBuffer(64), cuda.Stream()
    want = [("cudaFree", dev.ptr), ("cudaFreeHost", host.ptr), ("cudaStreamDestroy", stream.handle)]
    del dev, host, stream
    gc.collect()
    assert sorted(rt.released) == sorted(want)
    # Freed explicitly first: freed once, not again when collected.
    rt.released.clear()
    dev, host, stream = cuda.DeviceBuffer(64), cuda.PinnedBuffer(64), cuda.Stream()
    dev.free(), host.free(), stream.destroy()
    dev.free(), host.free(), stream.destroy()
    del dev, host, stream
    gc.collect()
    assert len(rt.released) == 3


def test_an_engine_nobody_closes_frees_its_buffers_when_collected(monkeypatch, fake_gpu):
    engine, _ = make_engine(monkeypatch, fake_gpu, num_contexts=2)
    check(engine.infer(feed(3)), feed(3))
    assert fake_gpu.memory
    del engine
    gc.collect()
    assert not fake_gpu.memory
    engine, _ = make_engine(monkeypatch, fake_gpu)
    engine.close()
    engine.close()
    del engine
    gc.collect()
    assert not fake_gpu.memory


def test_batch_limit_is_none_so_callers_never_pre_split(monkeypatch, fake_gpu):
    engine, _ = make_engine(monkeypatch, fake_gpu)
    with engine:
        assert engine.batch_limit() is None  # the engine splits and pads with the profiles itself
        assert engine.max_batch_size == 16
        assert engine.input_names() == ["a", "b"]


def test_one_capturing_logger_per_process_and_module(monkeypatch):
    # TensorRT keeps the first logger it is given as its global one: every Runtime, Builder and
    # parser of the process must get the same object, which must stay alive.
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    monkeypatch.setattr(_trt, "_LOGGERS", {})
    first = _trt.capturing_logger(lean, "WARNING")
    assert _trt.capturing_logger(lean, "ERROR") is first  # never quieter than asked before
    first.log(lean.ILogger.Severity.WARNING, "kept at WARNING")
    assert first.text() == "[WARNING] kept at WARNING"
    assert _trt.capturing_logger(lean, "INFO") is first  # more verbose when a caller asks
    since = first.mark()
    first.log(lean.ILogger.Severity.INFO, "now kept")
    first.log(lean.ILogger.Severity.VERBOSE, "still dropped")
    assert first.text(since=since) == "[INFO] now kept"


def test_capturing_logger_is_bounded_and_reports_only_new_messages(monkeypatch):
    lean = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean-cu13 is not installed")
    monkeypatch.setattr(_trt, "_LOGGERS", {})
    logger = _trt.capturing_logger(lean, "WARNING")
    for i in range(_trt.MAX_MESSAGES + 50):
        logger.log(lean.ILogger.Severity.WARNING, f"old {i}")
    assert len(logger.messages) == _trt.MAX_MESSAGES and logger.messages[0] == ("WARNING", "old 50")
    since = logger.mark()
    logger.log(lean.ILogger.Severity.ERROR, "new")
    assert logger.text(since=since) == "[ERROR] new"
    logger.clear()
    assert logger.text() == "(TensorRT logged nothing)"


def test_a_second_failure_does_not_repeat_the_first_ones_messages(monkeypatch, fake_gpu):
    engine, trt = make_engine(monkeypatch, fake_gpu, num_contexts=1)
    with engine:
        trt.state.engines[0].fail_execute = True
        for _ in range(2):
            with pytest.raises(EngineError) as raised:
                engine.infer(feed(2))
            assert str(raised.value).count("fake kernel failure") == 1, str(raised.value)


def test_execute_failure_carries_the_logger_message(monkeypatch, fake_gpu):
    engine, trt = make_engine(monkeypatch, fake_gpu)
    with engine:
        trt.state.engines[0].fail_execute = True
        with pytest.raises(EngineError, match=r"execute_async_v3 failed for input shapes .*\[ERROR\] fake kernel "
                                              r"failure"):
            engine.infer(feed(2))
        trt.state.engines[0].fail_execute = False
        f = feed(2)
        check(engine.infer(f), f)  # the slot was returned and works


def test_deserialize_failure_carries_versions_gpu_and_logger_reason(monkeypatch, fake_gpu):
    with pytest.raises(EngineError, match=r"TensorRT 10.11.0.33 could not deserialize the plan m.plan \(built by "
                                          r"TensorRT 10.11.0.33\) on NVIDIA L4 \(compute 8.9\): \[ERROR\] The engine "
                                          r"plan file is generated on an incompatible device, expecting compute 8.9 "
                                          r"got compute 9.0"):
        make_engine(monkeypatch, fake_gpu, deserialize_ok=False, name="m.plan")


def test_plan_checks_before_touching_the_gpu(monkeypatch, fake_gpu):
    with pytest.raises(EngineError, match=r"built by TensorRT 11.4.0.106, but this runtime is TensorRT 10.11.0.33"):
        make_engine(monkeypatch, fake_gpu, plan=fakes.plan_bytes(11, 4, 0, 106))
    with pytest.raises(EngineError, match="Not a TensorRT engine"):
        make_engine(monkeypatch, fake_gpu, plan=image_classifier())
    assert fake_gpu.device_info_calls == 0
    info = PlanInfo(tensorrt_version="10.11.0.33", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                    profiles=(Profile(1, 2, 4),), precision="fp32", onnx_sha256="0" * 64)
    with pytest.raises(EngineError, match=r"built on NVIDIA H100 80GB HBM3 \(compute 9.0\) without "
                                          r"--hardware_compatibility; such plans run only on GPUs of that compute "
                                          r"capability, and this GPU is NVIDIA L4 \(compute 8.9\).*"
                                          r"--hardware_compatibility ampere_plus"):
        make_engine(monkeypatch, fake_gpu, info=info)


def test_version_compatible_plans_allow_host_code(monkeypatch, fake_gpu):
    info = PlanInfo(tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
                    profiles=(Profile(1, 2, 4),), precision="fp32", onnx_sha256="0" * 64, version_compatible=True)
    engine, trt = make_engine(monkeypatch, fake_gpu, info=info)
    engine.close()
    assert trt.state.runtimes[0].engine_host_code_allowed is True
    engine, trt = make_engine(monkeypatch, fake_gpu, module_name="tensorrt_lean")
    engine.close()
    assert trt.state.runtimes[0].engine_host_code_allowed is True


def test_version_compatible_plan_without_sidecar_loads_under_the_full_runtime(monkeypatch, fake_gpu, caplog):
    # No sidecar: the first attempt keeps host code disallowed; an embedded lean runtime then
    # needs it, so the loader retries once with it allowed.
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.runtime"):
        engine, trt = make_engine(monkeypatch, fake_gpu, needs_host_code=True)
    engine.close()
    assert trt.state.deserialize_calls == 2 and trt.state.runtimes[0].engine_host_code_allowed is True
    assert "retrying with engine_host_code_allowed=True" in caplog.text
    # A plain plan loads at the first attempt, host code still disallowed.
    engine, trt = make_engine(monkeypatch, fake_gpu)
    engine.close()
    assert trt.state.deserialize_calls == 1 and trt.state.runtimes[0].engine_host_code_allowed is False
    # Told explicitly (False), the loader does not second-guess it.
    with pytest.raises(EngineError, match="host code is not allowed"):
        make_engine(monkeypatch, fake_gpu, needs_host_code=True, engine_host_code_allowed=False)


def test_version_compatible_plan_from_a_newer_minor_is_refused_before_the_gpu(monkeypatch, fake_gpu):
    info = PlanInfo(tensorrt_version="10.13.0.1", gpu_name="NVIDIA L4", compute_capability="8.9",
                    profiles=(Profile(1, 2, 4),), precision="fp32", onnx_sha256="0" * 64, version_compatible=True)
    with pytest.raises(EngineError, match=r"built --version_compatible by TensorRT 10.13.0.1, newer than this "
                                          r"runtime \(TensorRT 10.11.0.33\)"):
        make_engine(monkeypatch, fake_gpu, plan=fakes.plan_bytes(10, 13, 0, 1), info=info)
    assert fake_gpu.device_info_calls == 0
    older = dataclasses.replace(info, tensorrt_version="10.8.0.43")
    engine, _ = make_engine(monkeypatch, fake_gpu, plan=fakes.plan_bytes(10, 8, 0, 43), info=older)
    engine.close()


def _plan_info(**kw):
    base = dict(tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
                profiles=(Profile(1, 2, 4), Profile(5, 8, 16)), precision="fp32", onnx_sha256="0" * 64)
    base.update(kw)
    return PlanInfo(**base)


def test_profile_switch_and_shape_inference_failures_carry_tensorrts_log(monkeypatch, fake_gpu):
    """The bindings raise RuntimeError (never return False) when these fail."""
    engine, trt = make_engine(monkeypatch, fake_gpu, num_contexts=1)
    with engine:
        fake_engine = trt.state.engines[0]
        fake_engine.fail_profile = True  # sizing the buffers left the context on profile 1; 3 needs profile 0
        with pytest.raises(EngineError, match=r"context 0: set_optimization_profile_async\(0\) failed: Error in set "
                                              r"optimization profile async\.: \[ERROR\] setOptimizationProfileAsync: "
                                              r"profile index 0"):
            engine.infer(feed(3))
        fake_engine.fail_profile = False
        fake_engine.fail_infer_shapes = True
        with pytest.raises(EngineError, match=r"shape inference failed for input shapes .*infer_shapes error code: -1: "
                                              r"\[ERROR\] IExecutionContext::inferShapes: shape inference failed"):
            engine.infer(feed(3))
        fake_engine.fail_infer_shapes = False
        f = feed(3)
        check(engine.infer(f), f)  # the slot came back and the context switches again


def test_gpu_checks_follow_how_the_plan_was_built(monkeypatch, fake_gpu, caplog):
    """``same_compute_capability`` needs an equal compute capability, ampere_plus 8.0+."""
    h100 = dict(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    with pytest.raises(EngineError, match=r"built on NVIDIA H100 80GB HBM3 \(compute 9.0\) with "
                                          r"--hardware_compatibility same_compute_capability, which plans run only on "
                                          r"GPUs of that compute capability, and this GPU is NVIDIA L4 \(compute 8.9\)"):
        make_engine(monkeypatch, fake_gpu, info=_plan_info(hardware_compatibility="same_compute_capability", **h100))
    # ampere_plus: built on an H100, loads on an L4 (8.9), without the "other GPU" warning ...
    with caplog.at_level(logging.WARNING):
        engine, _ = make_engine(monkeypatch, fake_gpu, info=_plan_info(hardware_compatibility="ampere_plus", **h100))
    engine.close()
    assert "may not be the fastest" not in caplog.text
    # ... and is refused on a Turing T4 (7.5) before TensorRT is asked.
    fake_gpu.info = dataclasses.replace(fake_gpu.info, name="Tesla T4", major=7, minor=5)
    with pytest.raises(EngineError, match=r"--hardware_compatibility ampere_plus, which runs on Ampere or newer "
                                          r"GPUs \(compute 8.0\+\), and this GPU is Tesla T4 \(compute 7.5\)"):
        make_engine(monkeypatch, fake_gpu, info=_plan_info(hardware_compatibility="ampere_plus", **h100))


def test_the_lean_runtime_refuses_plans_that_are_not_version_compatible(monkeypatch, fake_gpu):
    """``tensorrt_lean`` runs version-compatible plans only."""
    with pytest.raises(EngineError, match=r"built without --version_compatible, and this runtime is the lean "
                                          r"runtime \(tensorrt_lean 10.11.0.33\), which runs version-compatible "
                                          r"plans only"):
        make_engine(monkeypatch, fake_gpu, module_name="tensorrt_lean", info=_plan_info(version_compatible=False))
    assert fake_gpu.device_info_calls == 0
    # No sidecar: TensorRT's lean runtime fails with its stub message (NVIDIA/TensorRT#4790); say what it means.
    with pytest.raises(EngineError, match=r"The lean runtime \(tensorrt_lean 10.11.0.33\) could not load the plan "
                                          r"m.plan: it runs only plans built --version_compatible.*Unexpected call "
                                          r"to stub loadRunner"):
        make_engine(monkeypatch, fake_gpu, module_name="tensorrt_lean", name="m.plan", deserialize_ok=False,
                    deserialize_error="Unexpected call to stub loadRunner")


def test_plans_without_their_lean_runtime_load_only_in_the_version_that_built_them(monkeypatch, fake_gpu):
    """Runtime.load_runtime's docstring: an EXCLUDE_LEAN_RUNTIME plan needs a lean
    runtime of the same version; this project loads none, so another version is refused up front."""
    info = _plan_info(tensorrt_version="10.8.0.43", version_compatible=True, exclude_lean_runtime=True)
    with pytest.raises(EngineError, match=r"built --version_compatible --exclude_lean_runtime by TensorRT 10.8.0.43, "
                                          r"and this runtime is TensorRT 10.11.0.33.*Rebuild it without "
                                          r"--exclude_lean_runtime"):
        make_engine(monkeypatch, fake_gpu, plan=fakes.plan_bytes(10, 8, 0, 43), info=info)
    assert fake_gpu.device_info_calls == 0
    same = dataclasses.replace(info, tensorrt_version="10.11.0.33")
    engine, trt = make_engine(monkeypatch, fake_gpu, info=same)
    engine.close()
    assert trt.state.runtimes[0].engine_host_code_allowed is False  # no embedded runtime to allow


def test_a_plan_without_the_magic_goes_to_tensorrt_with_a_warning(monkeypatch, fake_gpu, caplog):
    """The header layout is not promised for every plan; only ONNX bytes are refused."""
    with caplog.at_level(logging.WARNING):
        engine, trt = make_engine(monkeypatch, fake_gpu, plan=b"ptrt" + bytes(60), name="odd.plan")
    engine.close()
    assert trt.state.deserialize_calls == 1
    assert "odd.plan does not start with the plan magic b'ftrt'" in caplog.text


def test_device_inputs_never_pass_through_the_host(monkeypatch, fake_gpu):
    """Device arrays are copied device-to-device into the slot's buffers (padded and
    split on the device), and only the requested outputs come back to the host."""
    engine, trt = make_engine(monkeypatch, fake_gpu, profiles=((4, 8, 16),), num_contexts=2)
    executed = trt.state.engines[0].executed
    with engine:
        for n in (2, 8, 18, 40):  # padded to 4; one chunk; 9 + 9; 16 + 16 + 8
            f = feed(n, seed=n)
            device_feed = {name: fake_gpu.device_array(a) for name, a in f.items()}
            fake_gpu.copies.clear()
            del executed[:]
            out = engine.infer(device_feed, outputs=["sum"])
            assert list(out) == ["sum"] and out["sum"].shape == (n, 4)
            np.testing.assert_array_equal(out["sum"], f["a"] + f["b"].astype(np.float32))
            assert {kind for kind, _ in fake_gpu.copies} == {"d2d", "d2h"}, fake_gpu.copies
            # One device-to-host copy per chunk, of "sum" only (16 bytes a row; "flag" stays on the device).
            assert [nbytes for kind, nbytes in fake_gpu.copies if kind == "d2h"] == [rows * 16 for rows in executed]
        # Host and device inputs mixed: only the host one is staged and copied in.
        f = feed(5, seed=7)
        fake_gpu.copies.clear()
        out = engine.infer({"a": f["a"], "b": fake_gpu.device_array(f["b"])})
        check(out, f)
        assert [kind for kind, _ in fake_gpu.copies if kind != "d2h"] == ["h2d", "d2d"]
        # A device array names the stream that wrote it: the slot's stream waits for that stream first.
        out = engine.infer({name: fake_gpu.device_array(a, stream=77) for name, a in f.items()})
        check(out, f)
        assert {producer for _, producer in fake_gpu.waits} == {77}
        with pytest.raises(EngineError, match=r"Output tensor\(s\) \['logits'\] are not outputs of the model"):
            engine.infer(f, outputs=["logits"])


def test_infer_many_with_device_inputs_and_empty_batches_keeps_order(monkeypatch, fake_gpu):
    engine, _ = make_engine(monkeypatch, fake_gpu, num_contexts=2)
    feeds = [feed(n, seed=n) for n in (3, 0, 20, 0, 1)]
    with engine:
        device_feeds = [{k: fake_gpu.device_array(v) for k, v in f.items()} for f in feeds]
        outs = list(engine.infer_many(device_feeds, outputs=["flag"]))
    assert [o["flag"].shape[0] for o in outs] == [3, 0, 20, 0, 1]
    for f, out in zip(feeds, outs):
        np.testing.assert_array_equal(out["flag"], f["a"] > f["b"])


# -- builder glue against fakes ---------------------------------------------------------------------

#: The file ``--timing_cache timing.cache`` means for the fake GPU (NVIDIA L4, compute 8.9) and TensorRT 10.11.0.33.
L4_TIMING = "timing.cache.nvidia-l4-sm89-trt10.11.0.33"


@pytest.fixture
def fake_build(monkeypatch, fake_gpu):
    def install(**kw):
        fb = fakes.FakeBuild(**kw)
        monkeypatch.setattr(builder_mod, "import_tensorrt", lambda lean_ok=False: fb.module)
        return fb
    return install


def test_build_10x_fp16_sets_the_flag_and_profiles(fake_build, tmp_path):
    fb = fake_build(version="10.11.0.33")
    timing, l4_timing = tmp_path / "timing.cache", tmp_path / L4_TIMING
    l4_timing.write_bytes(b"timing:old")
    options = BuildOptions(profiles=["1,8,32", "33,64,128"], precision="fp16", workspace_gib=2, opt_level=4,
                           timing_cache=str(timing), version_compatible=True, exclude_lean_runtime=True,
                           hardware_compatibility="ampere_plus")
    built = builder_mod.build_plan(image_classifier(), options)
    assert fb.flags == ["FP16", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    # Each profile once: any number of contexts shares them at run time.
    assert fb.profiles == [{"images": ((1, 16, 16, 3), (8, 16, 16, 3), (32, 16, 16, 3))},
                           {"images": ((33, 16, 16, 3), (64, 16, 16, 3), (128, 16, 16, 3))}]
    assert fb.config.pool == {"WORKSPACE": 2 << 30} and fb.config.builder_optimization_level == 4
    assert fb.config.hardware_compatibility_level == "AMPERE_PLUS"
    assert fb.parsed == [image_classifier()]  # 10.x parses the fp32 model as is
    assert l4_timing.read_bytes() == b"timing:conv-10.11.0.33;old"
    info = built.info
    assert (info.tensorrt_version, info.gpu_name, info.compute_capability) == ("10.11.0.33", "NVIDIA L4", "8.9")
    assert info.labels == tuple(LABELS) and info.precision == "fp16" and info.extra["fp16_via"] == "BuilderFlag.FP16"
    assert info.extra["inputs"] == [{"name": "images", "onnx_type": "UINT8", "dims": [-1, 16, 16, 3]}]
    assert built.plan[:4] == b"ftrt"
    assert PlanInfo.from_json(info.to_json()) == info
    assert pickle.loads(pickle.dumps(builder_mod.EngineFromOnnx(image_classifier(), options))).options == options


def test_build_11x_fp16_converts_the_model_and_sets_no_precision_flag(fake_build):
    pytest.importorskip("onnxconverter_common", reason="onnxconverter-common (the 11.x fp16 path) is not installed")
    fb = fake_build(version="11.4.0.106")
    built = builder_mod.build_plan(image_classifier(), BuildOptions(precision="fp16"))
    assert fb.flags == []
    parsed = onnx.load_model_from_string(fb.parsed[0])
    assert {t.data_type for t in parsed.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert parsed.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert parsed.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert "onnx converted to fp16" in built.info.extra["fp16_via"]
    fb = fake_build(version="11.4.0.106")
    builder_mod.build_plan(image_classifier(), BuildOptions(precision="fp32"))
    assert fb.parsed == [image_classifier()]


def test_parser_failure_reports_parser_errors_and_log(fake_build):
    fake_build(parse_ok=False)
    with pytest.raises(EngineError, match=r"could not parse the ONNX model: node 3 \(fancy_0, op FancyOp\): "
                                          r"Unsupported operator FancyOp \[code UNSUPPORTED_NODE\]\. TensorRT log: "
                                          r"\[ERROR\] ModelImporter.cpp: failed to import node 3"):
        builder_mod.build_plan(image_classifier())


def test_build_failure_reports_the_logger(fake_build):
    fake_build(build_ok=False)
    with pytest.raises(EngineError, match=r"could not build the engine on NVIDIA L4 \(compute 8.9\) .*\[ERROR\] "
                                          r"Error Code 4: Internal Error \(out of workspace\)"):
        builder_mod.build_plan(image_classifier())


def test_models_the_profiles_cannot_describe_are_refused(fake_build):
    fake_build()
    with pytest.raises(EngineError, match=r"No input of the ONNX model has a dynamic batch dimension .*'images', "
                                          r"\[1, 16, 16, 3\]"):
        builder_mod.build_plan(image_classifier(batch=1))
    with pytest.raises(EngineError, match="Not an ONNX model"):
        builder_mod.build_plan(b"\x00garbage")


def test_build_multi_input_model(fake_build):
    fb = fake_build()
    builder_mod.build_plan(two_in_two_out(), BuildOptions(profiles=["2,4,8"]))
    assert fb.profiles == [{"a": ((2, 4), (4, 4), (8, 4)), "b": ((2, 4), (4, 4), (8, 4))}]


def test_hardware_level_is_looked_up_only_when_asked_for(fake_build):
    """SAME_COMPUTE_CAPABILITY first exists in 10.9; 10.0-10.8 must still build
    ampere_plus plans, and asking for the missing level is a clear error."""
    fb = fake_build(version="10.8.0.43")
    builder_mod.build_plan(image_classifier(), BuildOptions(hardware_compatibility="ampere_plus"))
    assert fb.config.hardware_compatibility_level == "AMPERE_PLUS"
    with pytest.raises(EngineError, match=r"--hardware_compatibility same_compute_capability needs TensorRT 10.9 or "
                                          r"later \(HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY\); this is "
                                          r"TensorRT 10.8.0.43"):
        builder_mod.build_plan(image_classifier(), BuildOptions(hardware_compatibility="same_compute_capability"))
    fb = fake_build(version="10.9.0.34")
    builder_mod.build_plan(image_classifier(), BuildOptions(hardware_compatibility="same_compute_capability"))
    assert fb.config.hardware_compatibility_level == "SAME_COMPUTE_CAPABILITY"


def test_a_corrupt_timing_cache_is_replaced_with_a_warning(fake_build, tmp_path, caplog):
    """``create_timing_cache`` gives None for a corrupt or foreign cache."""
    fake_build()
    timing, l4_timing = tmp_path / "timing.cache", tmp_path / L4_TIMING
    l4_timing.write_bytes(b"\x00garbage from another TensorRT")
    with caplog.at_level(logging.WARNING, logger="engines.tensorrt.builder"):
        built = builder_mod.build_plan(image_classifier(), BuildOptions(timing_cache=str(timing)))
    assert built.plan[:4] == b"ftrt"
    assert "is corrupt or from another TensorRT version; starting an empty one" in caplog.text
    assert l4_timing.read_bytes() == b"timing:conv-10.11.0.33"


def test_concurrent_builds_merge_the_timing_cache(fake_build, tmp_path):
    """Two builds (two workers filling the engine cache) read the same cache; the second to finish
    must keep what the first wrote meanwhile (Polygraphy: combine under a file lock)."""
    fb = fake_build()
    timing, l4_timing = tmp_path / "timing.cache", tmp_path / L4_TIMING
    l4_timing.write_bytes(b"timing:old")
    # While this build runs, another process (same GPU type) finishes its own and writes its timings.
    fb.during_build = lambda: l4_timing.write_bytes(b"timing:old;other-worker")
    builder_mod.build_plan(image_classifier(), BuildOptions(timing_cache=str(timing)))
    assert l4_timing.read_bytes() == b"timing:conv-10.11.0.33;old;other-worker"


def test_parser_gets_the_local_path_for_external_weights(fake_build, tmp_path):
    fb = fake_build(version="10.11.0.33")
    model = tmp_path / "m.onnx"
    model.write_bytes(image_classifier())
    builder_mod.build_plan(str(model))
    builder_mod.build_plan(image_classifier())
    assert fb.parse_paths == [str(model), None]  # bytes in memory: nothing to resolve against


# -- plan compatibility and headers, timing caches per GPU (docs/tensorrt.md, "What this relies on") --

def test_tensorrt_10_version_compatible_plans_load_in_a_tensorrt_11_runtime(monkeypatch, fake_gpu):
    """NVIDIA's 11.4 support matrix, "Engine Portability": "TensorRT 10 version-compatible engines can run
    with a TensorRT 11 runtime, and TensorRT 8 version-compatible engines can run with a TensorRT 10
    runtime. No other combination across major versions is supported." """
    ten = _plan_info(tensorrt_version="10.11.0.33", version_compatible=True)
    for module_name in ("tensorrt", "tensorrt_lean"):
        engine, trt = make_engine(monkeypatch, fake_gpu, plan=fakes.plan_bytes(10, 11, 0, 33), info=ten,
                                  version="11.4.0.106", module_name=module_name)
        engine.close()
        assert trt.state.runtimes[0].engine_host_code_allowed is True  # it runs its own embedded lean runtime
    refused = [
        # Not version-compatible: only the exact version that built it.
        (_plan_info(), fakes.plan_bytes(10, 11, 0, 33), "11.4.0.106",
         r"built by TensorRT 10.11.0.33 without --version_compatible, but this runtime is TensorRT 11.4.0.106"),
        # No embedded runtime: only the exact version.
        (_plan_info(version_compatible=True, exclude_lean_runtime=True), fakes.plan_bytes(10, 11, 0, 33), "11.4.0.106",
         r"--exclude_lean_runtime by TensorRT 10.11.0.33, and this runtime is TensorRT 11.4.0.106"),
        # Newer than the runtime, across majors too.
        (_plan_info(tensorrt_version="11.4.0.106", version_compatible=True), fakes.plan_bytes(11, 4, 0, 106),
         "10.11.0.33", r"built --version_compatible by TensorRT 11.4.0.106, newer than this runtime"),
    ]
    for info, plan, version, match in refused:
        with pytest.raises(EngineError, match=match):
            make_engine(monkeypatch, fake_gpu, plan=plan, info=info, version=version)
    assert fake_gpu.device_info_calls == 2  # only the two that loaded (full and lean runtime) reached the GPU


def test_which_majors_a_plan_crosses_is_what_nvidia_documents():
    from engines.tensorrt.plan import PlanHeader, check_plan_version

    ten, eight = PlanHeader(10, 11, 0, 33), PlanHeader(8, 6, 1, 6)
    check_plan_version(ten, (11, 4, 0, 106), version_compatible=True)
    check_plan_version(eight, (10, 11, 0, 33), version_compatible=True)
    check_plan_version(ten, (11, 4, 0, 106), version_compatible=None)  # no sidecar: TensorRT decides
    with pytest.raises(EngineError, match=r"TensorRT 8.6.1.6, but this runtime is TensorRT 11.4.0.106.*only "
                                          r"version-compatible plans of TensorRT 10 in 11 and of 8 in 10"):
        check_plan_version(eight, (11, 4, 0, 106), version_compatible=True)
    with pytest.raises(EngineError, match=r"TensorRT 10.11.0.33 without --version_compatible"):
        check_plan_version(ten, (11, 4, 0, 106), version_compatible=False)


def _plan_with_layout(serialization_version: int, version_bytes: bytes) -> bytes:
    return b"ftrt" + serialization_version.to_bytes(4, "little") + bytes(16) + version_bytes + bytes(36)


def test_a_header_of_another_layout_claims_no_version_and_tensorrt_decides(monkeypatch, fake_gpu, caplog):
    """trtexec (samples/common/sampleEngines.cpp, printPlanVersion) reads the version from bytes 24-27 only
    when bytes 4-7, the serialization version, are 0: "Blob index to store the plan version may depend on
    the serialization version"; for any other it prints "Serialization version is not supported"."""
    from engines.tensorrt.plan import read_plan_header

    assert read_plan_header(_plan_with_layout(0, bytes([10, 11, 0, 33]))).version == "10.11.0.33"
    plan = _plan_with_layout(1, bytes([48, 0, 7, 0]))  # what bytes 24-27 hold in another layout is unknown
    assert read_plan_header(plan) is None
    with caplog.at_level(logging.WARNING):
        engine, trt = make_engine(monkeypatch, fake_gpu, plan=plan, name="other-layout.plan")
    engine.close()
    assert trt.state.deserialize_calls == 1
    assert "other-layout.plan has plan header serialization version 1" in caplog.text
    assert "48.0.7.0" not in caplog.text
    with pytest.raises(EngineError, match=r"could not deserialize the plan x.plan \(its TensorRT version is not "
                                          r"read here: plan header serialization version 1.*\)"):
        make_engine(monkeypatch, fake_gpu, plan=plan, deserialize_ok=False, name="x.plan")


def test_timing_caches_of_different_gpus_never_merge(fake_build, fake_gpu, tmp_path):
    """One --timing_cache path shared by workers of two GPU types (often on gs://) keeps one cache per GPU
    and TensorRT version; NVIDIA's ITimingCache.combine: "Combining caches generated from devices with
    different device properties may lead to functional/performance bugs!" """
    fb = fake_build()
    timing = tmp_path / "timing.cache"
    fb.new_timings = {b"l4-tactic"}
    builder_mod.build_plan(image_classifier(), BuildOptions(timing_cache=str(timing)))
    fake_gpu.info = dataclasses.replace(fake_gpu.info, name="NVIDIA H100 80GB HBM3", major=9, minor=0)
    fb.new_timings = {b"h100-tactic"}
    builder_mod.build_plan(image_classifier(), BuildOptions(timing_cache=str(timing)))
    fb.new_timings = {b"h100-tactic-2"}
    builder_mod.build_plan(image_classifier(), BuildOptions(timing_cache=str(timing)))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        "timing.cache.nvidia-l4-sm89-trt10.11.0.33": b"timing:l4-tactic",
        "timing.cache.nvidia-h100-80gb-hbm3-sm90-trt10.11.0.33": b"timing:h100-tactic;h100-tactic-2"}
    assert fb.combine_calls == [False]  # the same GPU's caches merge, and a mismatch is not ignored
