"""Shape, profile and batch-splitting rules, plan header, sidecar, cache key and engine cache.

All pure Python: no TensorRT and no GPU needed.
"""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest

from engines.base import EngineError
from engines.tensorrt.cache import BuildTarget, EngineCache, cache_key
from engines.tensorrt.loader import TensorRTLoader
from engines.tensorrt.options import BuildOptions, Profile
from engines.labels import parse_labels
from engines.tensorrt.plan import (PlanHeader, PlanInfo, check_plan_version, read_plan_header,
                                   read_sidecar, sidecar_path, write_sidecar)
from engines.tensorrt.shapes import Chunk, TensorRange, batch_limits, check_batch_coverage, select_profile, split_points
from tests.tensorrt_fakes import plan_bytes
from tests.tensorrt_models import image_classifier


def ranges(*profiles, names=("images",), tail=(224, 224, 3)):
    return [{n: TensorRange((lo,) + tail, (opt,) + tail, (hi,) + tail) for n in names} for lo, opt, hi in profiles]


# -- profiles and options --------------------------------------------------------

def test_profile_parse_and_validation():
    assert Profile.parse("1, 64,256") == Profile(1, 64, 256)
    with pytest.raises(EngineError, match=r"1 <= min <= opt <= max, got min=8 opt=4 max=16"):
        Profile(8, 4, 16)
    with pytest.raises(EngineError, match="MIN,OPT,MAX batch sizes, e.g. 1,64,256; got '1,64'"):
        Profile.parse("1,64")
    with pytest.raises(EngineError, match="must be an int"):
        Profile(1.5, 2, 3)


def test_build_options_validation():
    with pytest.raises(EngineError, match=r"precision must be one of \('fp32', 'fp16'\), got 'int8'"):
        BuildOptions(precision="int8")
    with pytest.raises(EngineError, match="opt_level must be an int in 0..5, got 7"):
        BuildOptions(opt_level=7)
    with pytest.raises(EngineError, match="exclude_lean_runtime needs version_compatible=True"):
        BuildOptions(exclude_lean_runtime=True)
    with pytest.raises(EngineError, match="hardware_compatibility must be one of"):
        BuildOptions(hardware_compatibility="turing_plus")
    with pytest.raises(EngineError, match="at least one profile"):
        BuildOptions(profiles=())
    with pytest.raises(EngineError, match="workspace_gib must be > 0"):
        BuildOptions(workspace_gib=0)
    # Sidecars and caches of key schema 1 carry "contexts": still readable.
    assert BuildOptions.from_json(dict(BuildOptions().to_json(), contexts=2)) == BuildOptions()
    options = BuildOptions(profiles=["1,8,32", (33, 64, 128), {"min": 129, "opt": 200, "max": 256}])
    assert options.profiles == (Profile(1, 8, 32), Profile(33, 64, 128), Profile(129, 200, 256))
    assert BuildOptions.from_json(options.to_json()) == options


def test_cache_key_is_stable_and_ignores_the_timing_cache():
    a = BuildOptions(profiles=(Profile(1, 64, 256),), precision="fp16")
    assert a.cache_key() == BuildOptions(profiles=["1,64,256"], precision="fp16", timing_cache="t.cache").cache_key()
    assert a.cache_key() != BuildOptions(profiles=["1,64,256"], precision="fp32").cache_key()
    assert a.cache_key() != BuildOptions(profiles=["1,32,256"], precision="fp16").cache_key()
    assert a.cache_key() != BuildOptions(profiles=["1,64,256"], precision="fp16", version_compatible=True).cache_key()
    # Same key in a fresh interpreter (no hash() randomisation) and across releases of this code:
    # changing it silently orphans every cached plan.
    code = ("from engines.tensorrt.options import BuildOptions;"
            "print(BuildOptions(profiles=['1,64,256'], precision='fp16').cache_key())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Changed on purpose for schema 2 (profiles stored once, no "contexts"), so plans
    # with per-context profile copies are rebuilt rather than reused.
    assert out.stdout.strip() == a.cache_key() == "3ca73d4e235fb1c3"


def test_build_options_refuse_profiles_with_a_gap():
    # Batches 17..63 would fit no profile: a split could never run a batch of 32.
    with pytest.raises(EngineError, match=r"The optimization profiles leave a gap: profile 0 \[1..16\] opt 8 ends at "
                                          r"batch 16 and profile 1 \[64..256\] opt 128 starts at 64, so batches "
                                          r"17..63 fit no profile"):
        BuildOptions(profiles=["1,8,16", "64,128,256"])
    # Overlapping, touching or listed out of order is fine.
    BuildOptions(profiles=["17,64,256", "1,8,16"])
    BuildOptions(profiles=["1,8,32", "16,64,256", "200,300,512"])


# -- engine shapes -----------------------------------------------------------------

def test_select_profile_picks_smallest_covering():
    r = ranges((1, 64, 256), (1, 4, 8), (9, 16, 32))
    assert select_profile(r, {"images": (5, 224, 224, 3)}) == 1
    assert select_profile(r, {"images": (32, 224, 224, 3)}) == 2
    assert select_profile(r, {"images": (33, 224, 224, 3)}) == 0


def test_select_profile_refuses_with_tensor_shape_and_ranges():
    r = ranges((8, 16, 32), (33, 64, 64))
    with pytest.raises(EngineError, match=r"Input tensor: images \| shape \(2, 224, 224, 3\) is outside every "
                                          r"optimization profile .*profile 0: min \(8, 224, 224, 3\) opt "
                                          r"\(16, 224, 224, 3\) max \(32, 224, 224, 3\); profile 1: min "
                                          r"\(33, 224, 224, 3\).*--profile MIN,OPT,MAX"):
        select_profile(r, {"images": (2, 224, 224, 3)})
    with pytest.raises(EngineError, match=r"shape \(16, 112, 112, 3\) is outside every"):
        select_profile(r, {"images": (16, 112, 112, 3)})


def test_select_profile_names_the_uncovered_input_of_several():
    r = [{"a": TensorRange((1, 4), (2, 4), (4, 4)), "b": TensorRange((1, 4), (2, 4), (4, 4))}]
    with pytest.raises(EngineError, match=r"Input tensor: b \| shape \(3, 5\)"):
        select_profile(r, {"a": (3, 4), "b": (3, 5)})


def test_batch_limits_takes_the_tightest_input():
    r = {"a": TensorRange((2, 4), (8, 4), (16, 4)), "b": TensorRange((1, 4), (4, 4), (12, 4))}
    assert batch_limits(r) == (2, 8, 12)


def spans(chunks):
    return [(c.start, c.stop) if c.pad == 0 else (c.start, c.stop, c.size) for c in chunks]


def test_split_points():
    r = ranges((1, 4, 8), (9, 16, 32))
    assert split_points(0, r) == []
    assert spans(split_points(5, r)) == [(0, 5)]
    assert spans(split_points(32, r)) == [(0, 32)]
    assert spans(split_points(70, r)) == [(0, 32), (32, 64), (64, 70)]
    # A remainder below every profile's min is shared with the chunk before it.
    r = ranges((8, 16, 32))
    assert spans(split_points(68, r)) == [(0, 32), (32, 50), (50, 68)]
    for c in split_points(68, r):
        select_profile(r, {"images": (c.size, 224, 224, 3)})


def test_split_points_pads_where_an_even_split_falls_below_the_min():
    # 160 = 80 + 80 would put both halves below min 100: run 150, then 10 padded to 100.
    r = ranges((100, 120, 150))
    assert split_points(160, r) == [Chunk(0, 150, 150), Chunk(150, 160, 100)]
    assert split_points(160, r)[1].pad == 90
    # A batch below every min is padded up to the smallest min.
    assert split_points(3, ranges((4, 8, 16), (17, 32, 64))) == [Chunk(0, 3, 4)]


@pytest.mark.parametrize("profiles", [[(1, 4, 16), (17, 64, 256)], [(100, 120, 150)], [(8, 16, 32)],
                                      [(4, 8, 16), (10, 40, 50)], [(3, 3, 3)]])
def test_every_chunk_of_every_batch_fits_a_profile(profiles):
    r = ranges(*profiles)
    lo = min(p[0] for p in profiles)
    for batch in range(1, 700):
        chunks = split_points(batch, r)
        assert chunks[0].start == 0 and chunks[-1].stop == batch
        assert all(a.stop == b.start for a, b in zip(chunks, chunks[1:]))
        assert all(c.pad == 0 for c in chunks[:-1]) and all(c.size >= c.stop - c.start for c in chunks)
        for c in chunks:
            select_profile(r, {"images": (c.size, 224, 224, 3)})  # raises when no profile takes it
            assert c.pad == 0 or c.size == lo


def test_check_batch_coverage():
    check_batch_coverage([(1, 16), (17, 256)], ["a", "b"])
    check_batch_coverage([(64, 256), (1, 100)], ["a", "b"])
    with pytest.raises(EngineError, match=r"a ends at batch 16 and b starts at 64, so batches 17..63 fit no profile"):
        check_batch_coverage([(1, 16), (64, 256)], ["a", "b"])
    with pytest.raises(EngineError, match=r"c ends at batch 40 and b starts at 50"):
        check_batch_coverage([(1, 16), (50, 60), (10, 40)], ["a", "b", "c"])


# -- plan header and sidecar ----------------------------------------------------------

def test_read_plan_header():
    assert read_plan_header(plan_bytes(10, 11, 0, 33)) == PlanHeader(10, 11, 0, 33)
    assert read_plan_header(plan_bytes(11, 4, 0, 106)).version == "11.4.0.106"
    with pytest.raises(EngineError, match=r"Not a TensorRT engine: .* these bytes are an ONNX model.*--onnx_path"):
        read_plan_header(image_classifier())
    with pytest.raises(EngineError, match="Not a TensorRT engine: 10 bytes, and a plan has at least a 28-byte header"):
        read_plan_header(b"ftrt" + bytes(6))
    # No magic, not ONNX: the header layout is not promised for every kind of plan, so TensorRT decides.
    assert read_plan_header(b"\x08\x08\x12\x07pytorch" + bytes(40)) is None
    assert read_plan_header(b"ptrt" + bytes(60)) is None


def test_check_plan_version():
    check_plan_version(PlanHeader(10, 11, 0, 33), (10, 11, 0, 33), None)
    check_plan_version(PlanHeader(10, 8, 0, 43), (10, 11, 0, 33), True)  # version-compatible: TRT judges
    check_plan_version(PlanHeader(10, 8, 0, 43), (10, 11, 0, 33), None)  # unknown: TRT judges
    check_plan_version(PlanHeader(10, 11, 0, 33), (11, 4, 0, 106), True)  # NVIDIA supports 10 -> 11 for these
    with pytest.raises(EngineError, match=r"built by TensorRT 9.3.0.1, but this runtime is TensorRT 11.4.0.106; "
                                          r"across major versions NVIDIA supports only version-compatible plans"):
        check_plan_version(PlanHeader(9, 3, 0, 1), (11, 4, 0, 106), True)
    with pytest.raises(EngineError, match=r"built by TensorRT 10.11.0.33 without --version_compatible, but this "
                                          r"runtime is TensorRT 11.4.0.106"):
        check_plan_version(PlanHeader(10, 11, 0, 33), (11, 4, 0, 106), False)
    with pytest.raises(EngineError, match=r"built by TensorRT 10.8.0.43 without --version_compatible, but this "
                                          r"runtime is TensorRT 10.11.0.33"):
        check_plan_version(PlanHeader(10, 8, 0, 43), (10, 11, 0, 33), False)


def test_version_rules_compare_the_whole_version():
    """A version-compatible plan from a newer patch release is newer too, and a plan
    built --exclude_lean_runtime loads only in the exact version that built it."""
    with pytest.raises(EngineError, match=r"built --version_compatible by TensorRT 10.11.1.2, newer than this "
                                          r"runtime \(TensorRT 10.11.0.33\)"):
        check_plan_version(PlanHeader(10, 11, 1, 2), (10, 11, 0, 33), True)
    check_plan_version(PlanHeader(10, 11, 0, 1), (10, 11, 0, 33), True, exclude_lean_runtime=True)
    with pytest.raises(EngineError, match=r"--exclude_lean_runtime by TensorRT 10.8.0.43, and this runtime is "
                                          r"TensorRT 10.11.0.33"):
        check_plan_version(PlanHeader(10, 8, 0, 43), (10, 11, 0, 33), True, exclude_lean_runtime=True)
    with pytest.raises(EngineError, match=r"lean runtime \(tensorrt_lean 11.4.0.106\), which runs "
                                          r"version-compatible plans only"):
        check_plan_version(PlanHeader(11, 4, 0, 106), (11, 4, 0, 106), False, lean_runtime=True)
    check_plan_version(PlanHeader(11, 1, 0, 3), (11, 4, 0, 106), True, lean_runtime=True)


def test_engine_layout_is_a_pure_function_of_the_engines_tensors_and_profiles():
    from engines.tensorrt.layout import EngineLayout, TensorDesc

    tensors = [TensorDesc("images", True, "UINT8", (-1, 16, 16, 3)), TensorDesc("logits", False, "FLOAT", (-1, 10))]
    rest = (16, 16, 3)
    layout = EngineLayout.from_tensors(tensors, [{"images": ((1,) + rest, (8,) + rest, (32,) + rest)},
                                                 {"images": ((33,) + rest, (64,) + rest, (128,) + rest)}])
    assert layout.profiles == [(1, 8, 32), (33, 64, 128)] and layout.max_batch == 128 and layout.min_batch == 1
    assert layout.inputs["images"].describe() == "images: uint8[N, 16, 16, 3]"
    assert layout.max_input_shapes() == [{"images": (32,) + rest}, {"images": (128,) + rest}]
    with pytest.raises(EngineError, match=r"profiles leave a gap: profile 0 \(batch 1..32\) ends at batch 32"):
        EngineLayout.from_tensors(tensors, [{"images": ((1,) + rest, (8,) + rest, (32,) + rest)},
                                            {"images": ((64,) + rest, (64,) + rest, (128,) + rest)}])
    with pytest.raises(EngineError, match="Tensor: logits | TensorRT type INT4 is not supported"):
        EngineLayout.from_tensors([tensors[0], TensorDesc("logits", False, "INT4", (-1, 10))],
                                  [{"images": ((1,) + rest, (8,) + rest, (32,) + rest)}])
    with pytest.raises(EngineError, match="no optimization profile"):
        EngineLayout.from_tensors(tensors, [])


def _info(**kw):
    base = dict(tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
                profiles=(Profile(1, 64, 256),), precision="fp16", onnx_sha256="ab" * 32, labels=("cat", "dog"),
                extra={"plan_sha256": "00"})
    base.update(kw)
    return PlanInfo(**base)


def test_sidecar_round_trip(tmp_path):
    plan = str(tmp_path / "model.plan")
    assert write_sidecar(plan, _info()) == plan + ".json" == sidecar_path(plan)
    data = json.loads((tmp_path / "model.plan.json").read_text())
    assert data["gpu"] == {"name": "NVIDIA L4", "compute_capability": "8.9"}
    assert data["profiles"] == [{"min": 1, "opt": 64, "max": 256}]
    assert data["tensorrt_version"] == "10.11.0.33" and data["onnx_sha256"] == "ab" * 32
    info = read_sidecar(plan)
    assert info == _info() and info.extra["plan_sha256"] == "00"


def test_sidecar_errors(tmp_path):
    plan = str(tmp_path / "model.plan")
    with pytest.raises(EngineError, match=r"No sidecar .*model.plan.json beside the plan"):
        read_sidecar(plan)
    assert read_sidecar(plan, required=False) is None
    (tmp_path / "model.plan.json").write_text("{not json")
    with pytest.raises(EngineError, match="is not valid JSON"):
        read_sidecar(plan)
    (tmp_path / "model.plan.json").write_text('{"tensorrt_version": "10.1"}')
    with pytest.raises(EngineError, match=r"not a plan sidecar written by `python -m model_tools.build`: missing or "
                                          r"bad field 'gpu'"):
        read_sidecar(plan)


def test_parse_labels():
    assert parse_labels('["a", "b c"]') == ["a", "b c"]
    assert parse_labels("a\nb c\n\n") == ["a", "b c"]
    assert parse_labels(None) is None
    with pytest.raises(EngineError, match="look like a JSON list but do not parse"):
        parse_labels("[a, b")


# -- engine cache ------------------------------------------------------------------------

TARGET = BuildTarget("NVIDIA L4", "8.9", "10.11.0.33")


class CountingBuilder:
    """A fake TensorRT build: returns deterministic bytes, counts calls, can be slow."""

    def __init__(self, delay=0.0):
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, onnx_bytes, options, device):
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        plan = plan_bytes(10, 11, 0, 33) + hashlib.sha256(onnx_bytes + options.cache_key().encode()).digest()
        return plan, _info(onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(), profiles=options.profiles,
                           precision=options.precision, extra={})


def test_cache_key_names_model_gpu_version_and_options():
    options = BuildOptions(precision="fp16")
    key = cache_key("0123456789abcdef" * 4, options, TARGET)
    assert key == f"0123456789abcdef-nvidia-l4-sm89-trt10.11.0.33-{options.cache_key()}"
    assert cache_key("0123456789abcdef" * 4, options, BuildTarget("NVIDIA A100-SXM4-40GB", "8.0", "10.11.0.33")) \
        == f"0123456789abcdef-nvidia-a100-sxm4-40gb-sm80-trt10.11.0.33-{options.cache_key()}"


def test_engine_cache_builds_once_and_then_reads(tmp_path):
    builder = CountingBuilder()
    options = BuildOptions(profiles=["1,8,32"], precision="fp16")
    plan, info, path = EngineCache(str(tmp_path), build=builder).get_or_build(b"onnx-model", options, target=TARGET)
    assert builder.calls == 1 and os.path.isfile(path) and os.path.isfile(path + ".json")
    assert info.extra["plan_sha256"] == hashlib.sha256(plan).hexdigest()
    # A second worker (new cache object) reads it back without building.
    plan2, info2, path2 = EngineCache(str(tmp_path), build=builder).get_or_build(b"onnx-model", options, target=TARGET)
    assert (plan2, path2, builder.calls) == (plan, path, 1)
    assert info2.precision == "fp16" and info2.profiles == (Profile(1, 8, 32),)
    # Another GPU type, TensorRT version, option or model: another plan.
    cache = EngineCache(str(tmp_path), build=builder)
    cache.get_or_build(b"onnx-model", options, target=BuildTarget("NVIDIA A100", "8.0", "10.11.0.33"))
    cache.get_or_build(b"onnx-model", options, target=BuildTarget("NVIDIA L4", "8.9", "10.12.0.36"))
    cache.get_or_build(b"onnx-model", BuildOptions(profiles=["1,8,32"]), target=TARGET)
    cache.get_or_build(b"other-model", options, target=TARGET)
    assert builder.calls == 5
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".plan")]) == 5
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_engine_cache_racing_workers_build_once(tmp_path):
    builder = CountingBuilder(delay=0.3)
    options = BuildOptions()
    results = []

    def worker():
        results.append(EngineCache(str(tmp_path), build=builder).get_or_build(b"model", options, target=TARGET))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builder.calls == 1
    assert len({r[0] for r in results}) == 1 and len(results) == 4


def test_engine_cache_rebuilds_a_mismatched_pair(tmp_path):
    builder = CountingBuilder()
    cache = EngineCache(str(tmp_path), build=builder)
    plan, _, path = cache.get_or_build(b"model", BuildOptions(), target=TARGET)
    with open(path, "wb") as f:  # another writer's plan next to this sidecar
        f.write(plan + b"different")
    plan2, _, _ = cache.get_or_build(b"model", BuildOptions(), target=TARGET)
    assert builder.calls == 2 and plan2 == plan


# -- loader recipe ---------------------------------------------------------------------------

def test_loader_validation_and_pickling(tmp_path):
    with pytest.raises(EngineError, match="Give exactly one of engine_path .* or onnx_path"):
        TensorRTLoader()
    with pytest.raises(EngineError, match="Give exactly one of"):
        TensorRTLoader(engine_path="a.plan", onnx_path="a.onnx")
    with pytest.raises(EngineError, match="engine_cache is used with onnx_path"):
        TensorRTLoader(engine_path="a.plan", engine_cache="gs://b/c")
    with pytest.raises(EngineError, match="num_contexts must be an int >= 1, got 0"):
        TensorRTLoader(engine_path="a.plan", num_contexts=0)
    with pytest.raises(EngineError, match="device must be a GPU index >= 0 or 'auto', got -1"):
        TensorRTLoader(engine_path="a.plan", device=-1)
    loader = TensorRTLoader(onnx_path="gs://bucket/m.onnx", engine_cache="gs://bucket/plans",
                            build_options=BuildOptions(profiles=["1,16,64"], precision="fp16"), device="auto")
    assert pickle.loads(pickle.dumps(loader)) == loader
    plan = str(tmp_path / "m.plan")
    write_sidecar(plan, _info(profiles=(Profile(1, 8, 32), Profile(33, 128, 512))))
    assert TensorRTLoader(engine_path=plan).plan_info().profiles == (Profile(1, 8, 32), Profile(33, 128, 512))
    assert TensorRTLoader(engine_path=str(tmp_path / "other.plan")).plan_info() is None


def test_loader_missing_plan_file_says_how_to_build_one(tmp_path):
    missing = str(tmp_path / "nope.plan")
    with pytest.raises(EngineError, match=r"Engine file not found: .*nope.plan. Build one with `python -m "
                                          r"model_tools.build --onnx MODEL.onnx"):
        TensorRTLoader(engine_path=missing)()
