"""The validate command's logic, with ONNX Runtime on both sides (no TensorRT needed)."""

from __future__ import annotations

import logging

import pytest

from engines.base import EngineError
from engines.onnxruntime_engine import OnnxRuntimeEngine
from engines.tensorrt.options import Profile
from engines.tensorrt.plan import PlanInfo, write_sidecar
from tests.tensorrt_models import image_classifier


@pytest.fixture
def models(tmp_path):
    from engines.tensorrt.builder import convert_to_fp16

    paths = {}
    for name, data in {"ref": image_classifier(), "shifted": image_classifier(bias_shift=1.0),
                       "small": image_classifier(size=8)}.items():
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(data)
    try:
        paths["fp16"] = tmp_path / "fp16.onnx"
        paths["fp16"].write_bytes(convert_to_fp16(image_classifier()))
    except ImportError:
        paths.pop("fp16")
    return {k: str(v) for k, v in paths.items()}


def test_compare_reports_numbers_and_agreement(models):
    from model_tools.validate import compare, skimage_photos

    photos = skimage_photos()
    ref = OnnxRuntimeEngine(models["ref"])
    report = compare(OnnxRuntimeEngine(models["ref"]), ref, photos)
    assert report.ok and report.images == 11 and report.output == "logits"
    assert report.max_abs_logits == 0 and report.top1_agreement == 1.0
    bad = compare(OnnxRuntimeEngine(models["shifted"]), ref, photos)
    assert not bad.ok
    assert bad.max_abs_logits == pytest.approx(1.0, abs=1e-5)
    assert any(f.startswith("max |logits diff| 1 > 0.05") for f in bad.failures), bad.failures
    with pytest.raises(EngineError, match="The engines' inputs differ"):
        compare(OnnxRuntimeEngine(models["small"]), ref, photos)
    with pytest.raises(EngineError, match="No images to validate with"):
        compare(ref, ref, [])


def test_validate_command_exit_codes(models, capsys, tmp_path):
    from model_tools import validate

    ok = validate.main(["--engine", "onnxruntime", "--onnx_path", models["ref"], "--reference", models["ref"],
                        "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert ok == 0 and "11 images, output 'logits', fp32: max |logits diff| 0" in out and "OK" in out
    import json

    assert json.loads((tmp_path / "report.json").read_text())["ok"] is True
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["shifted"],
                          "--reference", models["ref"]]) == 1
    assert "FAILED: max |logits diff| 1 > 0.05" in capsys.readouterr().err
    # Looser numeric tolerances still fail it: its top-1 class differs on every photo.
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["shifted"], "--reference", models["ref"],
                          "--atol_logits", "1.5", "--atol_probs", "1"]) == 1
    assert "FAILED: top-1 agreement 0.0% < 90.0%" in capsys.readouterr().err
    # Looser, explicit tolerances on every count accept the same candidate.
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["shifted"], "--reference", models["ref"],
                          "--atol_logits", "1.5", "--atol_probs", "1", "--min_top1", "0"]) == 0
    assert validate.main(["--engine", "onnxruntime", "--engine_path", "x.plan", "--reference", models["ref"]]) == 2
    assert "--engine onnxruntime runs --onnx_path" in capsys.readouterr().err


def test_validate_fp16_model_with_fp16_tolerances(models, capsys):
    if "fp16" not in models:
        pytest.skip("onnxconverter-common is not installed")
    from model_tools import validate

    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["fp16"], "--reference", models["ref"]]) == 0
    assert ", fp16: max |logits diff|" in capsys.readouterr().out


def test_validate_on_real_jpegs(models, tmp_path, capsys):
    from PIL import Image

    from model_tools import validate

    paths = []
    for i, name in enumerate(("astronaut", "coffee")):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(__import__("skimage.data", fromlist=[name]), name)()).save(path, quality=90)
        paths.append(str(path))
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", models["ref"], "--reference", models["ref"],
                          "--images", *paths]) == 0
    assert "2 images" in capsys.readouterr().out


def test_validate_without_tensorrt_says_how_to_get_it(no_tensorrt, models, capsys, tmp_path):
    from model_tools import validate

    assert validate.main(["--onnx_path", models["ref"], "--reference", models["ref"]]) == 2
    assert "TensorRT is not importable" in capsys.readouterr().err


def test_validate_plan_without_sidecar_honours_fp16_and_says_so(tmp_path, monkeypatch, caplog):
    from model_tools import validate
    from engines.tensorrt.loader import TensorRTLoader

    monkeypatch.setattr(TensorRTLoader, "__call__", lambda self: "engine")  # no TensorRT here
    plan = tmp_path / "bare.plan"
    plan.write_bytes(b"ftrt" + bytes(60))
    base = ["--engine_path", str(plan), "--reference", "ref.onnx"]
    with caplog.at_level(logging.INFO, logger="model_tools.validate"):
        assert validate.make_candidate(validate.parse_args(base + ["--fp16"])) == ("engine", "fp16")
        assert validate.make_candidate(validate.parse_args(base)) == ("engine", "fp32")
    assert [r.getMessage() for r in caplog.records] == [
        f"no sidecar {plan}.json beside the plan: using fp16 tolerances (from --fp16)",
        f"no sidecar {plan}.json beside the plan: using fp32 tolerances (pass --fp16 or --precision fp16 for an "
        f"fp16 plan)"]
    write_sidecar(str(plan), PlanInfo(tensorrt_version="10.11.0.33", gpu_name="NVIDIA L4", compute_capability="8.9",
                                      profiles=(Profile(1, 8, 16),), precision="fp16", onnx_sha256="0" * 64))
    assert validate.make_candidate(validate.parse_args(base)) == ("engine", "fp16")
