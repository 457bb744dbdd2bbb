"""Shared fixtures: the real prepared model, real photos, a mixed good/broken corpus, tiny ONNX models."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "efficientnet_lite0.onnx"

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian Mau
ESPRESSO_OR_CUP = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="session")
def model_path() -> str:
    if not MODEL.exists():
        pytest.fail(f"{MODEL} is missing: run `make model` (make test does it first)")
    return str(MODEL)


def photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def noise_jpegs(folder: Path, count: int) -> None:
    """``count`` small random JPEGs of distinct heights in ``folder``, named 00.jpg, 01.jpg, ..."""
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (24 + i, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.jpg")


def run_bundle(dofn, elements) -> list:
    """Runs one bundle of ``elements`` through ``dofn`` as Beam would, on this thread (set-up to tear-down), with no
    window: every output of ``process`` and ``finish_bundle``, in order (tagged ones as ``TaggedOutput``)."""
    dofn.setup()
    dofn.start_bundle()
    out = []
    try:
        for element in elements:
            out += list(dofn.process(element, window=None, timestamp=None))
        out += list(dofn.finish_bundle() or ())
    finally:
        dofn.teardown()
    return out


#: Broken inputs and the dead-letter reason each must produce.
BROKEN = {
    "empty.jpg": (b"", "empty file"),
    "text.jpg": (b"just some text, not a JPEG\n", "not an image: the file holds text"),
    "vector.svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported format: SVG vector image"),
    "scan.pdf": (b"%PDF-1.7\n%binary\n1 0 obj\n<<>>\nendobj\n", "unsupported format: PDF document"),
}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory with 12 good JPEGs (real photos, random crops) and broken files (incl. an
    oversized image and a dangling symlink).

    Returns:
        (directory, list of good paths, dict broken name -> expected reason regex).
    """
    directory = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    good = []
    for name in ("chelsea", "coffee"):
        path = directory / f"{name}.jpg"
        path.write_bytes(jpeg_bytes(photo(name)))
        good.append(str(path))
    sources = [photo(n) for n in ("astronaut", "rocket", "chelsea", "coffee")]
    for i in range(10):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(h // 2, h)), int(rng.integers(w // 2, w))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        path = directory / f"crop_{i:02d}.jpg"
        path.write_bytes(jpeg_bytes(np.ascontiguousarray(src[y:y + ch, x:x + cw]), int(rng.integers(75, 96))))
        good.append(str(path))
    truncated = jpeg_bytes(photo("astronaut"))
    broken = {name: reason for name, (_, reason) in BROKEN.items()}
    for name, (content, _) in BROKEN.items():
        (directory / name).write_bytes(content)
    (directory / "truncated.jpg").write_bytes(truncated[: len(truncated) // 4])
    broken["truncated.jpg"] = "truncated or corrupt JPEG"
    Image.new("1", (10_000, 10_000)).save(directory / "oversized.png")  # 100 Mpx in a few kB
    broken["oversized.png"] = r"10000x10000 = 100.0 Mpx, over the pixel limit of 89.5 Mpx"
    # Beam's local listing skips files it cannot stat; the pipeline must still report this one.
    os.symlink(directory / "moved_away_target.jpg", directory / "moved_away.jpg")
    broken["moved_away.jpg"] = r"broken symlink \(its target is missing"
    return str(directory), sorted(good), broken


def tiny_model(path: Path, kind: str = "sum") -> str:
    """Writes a tiny ONNX model built with onnx.helper and returns its path.

    kinds:
        ``sum``: input ``x`` uint8 [N, 4, 4, 3] -> ``total`` float32 [N] (sum of pixels) and
        ``doubled`` float32 [N, 4, 4, 3].
        ``multi``: inputs ``a`` float32 [N, 3] and ``b`` int64 [N, 1] -> ``c`` float32 [N, 3] = a + b
        and ``flag`` bool [N, 3] = a > b.
    """
    import onnx
    from onnx import TensorProto, helper

    if kind == "sum":
        x = helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 4, 4, 3])
        total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"])
        doubled = helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 4, 4, 3])
        axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
        two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
        nodes = [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["xf", "axes"], ["total"], keepdims=0),
            helper.make_node("Mul", ["xf", "two"], ["doubled"]),
        ]
        graph = helper.make_graph(nodes, "sum", [x], [total, doubled], initializer=[axes, two])
    elif kind == "multi":
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3])
        b = helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 1])
        c = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 3])
        flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, ["N", 3])
        nodes = [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "bf"], ["c"]),
            helper.make_node("Greater", ["a", "bf"], ["flag"]),
        ]
        graph = helper.make_graph(nodes, "multi", [a, b], [c, flag])
    else:
        raise ValueError(kind)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return str(path)


@pytest.fixture
def sum_model(tmp_path) -> str:
    return tiny_model(tmp_path / "sum.onnx", "sum")


@pytest.fixture
def multi_model(tmp_path) -> str:
    return tiny_model(tmp_path / "multi.onnx", "multi")


@pytest.fixture
def no_tensorrt(monkeypatch):
    """As on a laptop: importing tensorrt, tensorrt_lean, cuda or cupy fails."""
    for name in ("tensorrt", "tensorrt_lean", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cupy"):
        monkeypatch.setitem(sys.modules, name, None)
    from engines import cuda

    monkeypatch.setattr(cuda, "_cudart", None)


@pytest.fixture(scope="session")
def bigquery_server(tmp_path_factory):
    """bqemulator and the Cloud Storage emulator its loads read from, for the session (tests/bigquery_server.py)."""
    from tests import bigquery_server as server
    from tests.processes import stop_process

    if not server.BQ_PYTHON.exists():
        pytest.skip(f"{server.BQ_PYTHON} is missing: run `make .venv-bq/.installed` (make test does)")
    running = server.start(tmp_path_factory.mktemp("bigquery"))
    yield running
    for proc in running.processes:
        stop_process(proc)
