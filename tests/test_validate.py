"""The validate command's logic, with ONNX Runtime on both sides (no TensorRT needed)."""

from __future__ import annotations

import logging

import onnx
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


# A user's own float model (docs/own-model.md): the reference is fed the photos converted in numpy.
IMAGENET_ARGS = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


def test_prepared_model_against_the_original_float_model(tmp_path, capsys):
    from model_tools import validate
    from model_tools import prepare_model
    from tests.model_variants import FLOAT_MODEL, float16, load_float_model

    prepared = str(tmp_path / "prepared.onnx")
    assert prepare_model.main([str(FLOAT_MODEL), prepared, *IMAGENET_ARGS]) == 0
    capsys.readouterr()
    base = ["--engine", "onnxruntime", "--reference", str(FLOAT_MODEL), *IMAGENET_ARGS]
    assert validate.main(base + ["--onnx_path", prepared]) == 0
    assert "11 images, output 'logits', fp32: max |logits diff| 0 (tol 0.05)" in capsys.readouterr().out
    # The original, wrapped in memory as a job wraps it, is the same model.
    assert validate.main(base + ["--onnx_path", str(FLOAT_MODEL)]) == 0
    # A float16 copy passes with float16 tolerances, not with a tight one.
    half = tmp_path / "half.onnx"
    onnx.save_model(float16(load_float_model()), str(half))
    assert validate.main(base + ["--onnx_path", str(half)]) == 0
    assert ", fp16: max |logits diff|" in capsys.readouterr().out
    assert validate.main(base + ["--onnx_path", str(half), "--atol_logits", "0.001"]) == 1
    assert "FAILED: max |logits diff|" in capsys.readouterr().err
    # Flags other than those the model was prepared with are refused before anything runs.
    assert validate.main(base[:4] + ["--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--onnx_path", prepared]) == 2
    assert "prepared.onnx was prepared with --mean 0.485,0.456,0.406" in capsys.readouterr().err
    assert validate.main(["--engine", "onnxruntime", "--reference", str(FLOAT_MODEL), "--onnx_path", prepared,
                          "--std", "0.229,0.224,0.225"]) == 2
    assert "--std was given without --mean" in capsys.readouterr().err


def test_own_model_candidate_must_take_uint8_images():
    from engines.model_adapter import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
    from model_tools.validate import compare, skimage_photos
    from tests.model_variants import FLOAT_MODEL

    original = OnnxRuntimeEngine(str(FLOAT_MODEL))
    with pytest.raises(EngineError, match=r"With --mean/--std the candidate takes the pipeline's uint8 images of the "
                                          r"reference's size, uint8 NHWC \(224, 224\); it takes images: "
                                          r"float32\[N, 3, 224, 224\]. Write the candidate with python -m "
                                          r"model_tools.prepare_model --mean 0.485,0.456,0.406"):
        compare(original, original, skimage_photos()[:1], preprocessing=Preprocessing(IMAGENET_MEAN, IMAGENET_STD))


def test_reference_exported_with_its_weights_beside_it(tmp_path, capsys):
    """torch.onnx.export (torch >= 2.9) writes model.onnx and model.onnx.data: both sides read the weights."""
    from model_tools import validate
    from tests.model_variants import copy, load_float_model

    export = tmp_path / "model.onnx"
    onnx.save_model(copy(load_float_model()), str(export), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    assert validate.main(["--engine", "onnxruntime", "--onnx_path", str(export), "--reference", str(export),
                          *IMAGENET_ARGS, "--images", *_photo_files(tmp_path)]) == 0
    assert "2 images, output 'logits', fp32: max |logits diff| 0 " in capsys.readouterr().out


def _photo_files(folder):
    from PIL import Image

    from tests.conftest import photo

    paths = []
    for name in ("chelsea", "coffee"):
        Image.fromarray(photo(name)).save(folder / f"{name}.jpg", quality=90)
        paths.append(str(folder / f"{name}.jpg"))
    return paths


def test_a_non_square_model_is_validated_on_the_pipelines_own_height_by_width_crops():
    """A 240 x 320 (height x width) model: validate crops as the pipeline does for that model, the
    shorter side first resized to 256/224 of the longer crop side, instead of refusing it."""
    import numpy as np
    from PIL import Image

    from images.pillow_decoder import PreprocessConfig, resize_and_crop
    from model_tools.validate import batch_for, compare, skimage_photos

    model = onnx.load_from_string(image_classifier())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value = 240, 320
    wide = OnnxRuntimeEngine(model.SerializeToString())
    photos = skimage_photos()[:3]
    batch = batch_for(wide.input_specs["images"], [image for _, image in photos])
    config = PreprocessConfig(resize=366, crop=240, crop_width=320)  # 366 = round(320 * 256 / 224)
    want = np.stack([resize_and_crop(Image.fromarray(image), config) for _, image in photos])
    assert batch.shape == (3, 240, 320, 3)
    np.testing.assert_array_equal(batch, want)
    report = compare(wide, OnnxRuntimeEngine(model.SerializeToString()), photos)
    assert report.ok and report.images == 3 and report.top1_agreement == 1.0


def test_onnx_runtime_at_fp16_is_checked_as_a_job_converts_it(tmp_path, capsys):
    """``--precision fp16`` with ``--engine onnxruntime`` converts a float32 model where it loads, as a job's
    ``--precision fp16`` does, and holds it to the fp16 tolerances against the float32 original."""
    from model_tools import validate
    from tests.model_variants import FLOAT_MODEL

    base = ["--engine", "onnxruntime", "--reference", str(FLOAT_MODEL), *IMAGENET_ARGS, "--onnx_path", str(FLOAT_MODEL)]
    assert validate.main(base + ["--precision", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "11 images, output 'logits', fp16: max |logits diff|" in out and "top-1 agreement 100.0%" in out
    assert "max |logits diff| 0 (" not in out  # it did run in float16
