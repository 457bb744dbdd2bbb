"""``python -m model_tools.prepare_model`` on the real float32 export and its variants."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from engines.model_adapter import (IMAGENET_MEAN, IMAGENET_STD, OUTPUT_ACTIVATION_KEY, Preprocessing, describe_input,
                                   resolve_activation, wrap)
from model_tools import prepare_model
from tests import model_variants
from tests.model_variants import crops, run

IMAGENET_ARGS = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]


@pytest.fixture(scope="module")
def float_model() -> onnx.ModelProto:
    return model_variants.load_float_model()


def _meta(model) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def test_writes_the_model_a_job_wraps_in_memory(float_model, tmp_path, capsys):
    out = tmp_path / "prepared.onnx"
    assert prepare_model.main([str(model_variants.FLOAT_MODEL), str(out), *IMAGENET_ARGS]) == 0
    assert capsys.readouterr().out == (
        f"wrote {out}: input images_uint8: uint8 NHWC (N, 224, 224, 3) RGB (was images: float32 NCHW (N, 3, 224, "
        f"224); --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 now in the graph); output 'logits': the pipeline "
        f"applies softmax\n")
    prepared = onnx.load(str(out))
    onnx.checker.check_model(prepared)
    assert _meta(prepared)["labels"] == _meta(float_model)["labels"]
    assert json.loads(_meta(prepared)[OUTPUT_ACTIVATION_KEY]) == {"logits": "softmax"}
    batch = crops(224, 224)[:2]
    in_memory = wrap(float_model, Preprocessing(IMAGENET_MEAN, IMAGENET_STD))
    np.testing.assert_array_equal(run(prepared, batch), run(in_memory, batch))
    # Prepared again with the same flags, or none: it is kept as it is.
    again = tmp_path / "again.onnx"
    assert prepare_model.main([str(out), str(again)]) == 0
    assert "(input unchanged)" in capsys.readouterr().out
    assert onnx.load(str(again)).graph == prepared.graph


def test_float_model_without_mean_and_std_is_refused(tmp_path, capsys):
    out = tmp_path / "prepared.onnx"
    assert prepare_model.main([str(model_variants.FLOAT_MODEL), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: efficientnet_lite0_float32_nchw.onnx takes float32 input (images: float32 NCHW "
                          "(N, 3, 224, 224)), normalised outside the model: pass the mean and std")
    assert "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 for ImageNet-trained torchvision/timm models" in err
    assert not out.exists()
    assert prepare_model.main([str(model_variants.FLOAT_MODEL), str(out), "--mean", "0.485,0.456,0.406"]) == 2
    assert "--mean was given without --std" in capsys.readouterr().err


def test_activation_is_recorded_for_jobs_and_plans(float_model, tmp_path, capsys):
    tagger = tmp_path / "tagger.onnx"
    onnx.save_model(float_model, str(tagger))
    out = tmp_path / "tagger_uint8.onnx"
    assert prepare_model.main([str(tagger), str(out), *IMAGENET_ARGS, "--activation", "sigmoid"]) == 0
    assert resolve_activation(onnx.load(str(out)), "logits") == "sigmoid"

    ended = tmp_path / "probs.onnx"
    onnx.save_model(model_variants.softmax_ended(float_model), str(ended))
    out = tmp_path / "probs_uint8.onnx"
    assert prepare_model.main([str(ended), str(out), *IMAGENET_ARGS]) == 0
    assert capsys.readouterr().out.endswith("output 'probs': the pipeline applies none\n")
    assert prepare_model.main([str(ended), str(out), *IMAGENET_ARGS, "--activation", "softmax"]) == 2
    assert "output 'probs' of probs.onnx already ends in Softmax" in capsys.readouterr().err
    assert prepare_model.main([str(ended), str(out), *IMAGENET_ARGS, "--output_name", "logits"]) == 2
    assert "Output tensor: logits | not an output of probs.onnx (outputs: ['probs'])" in capsys.readouterr().err


def test_bgr_float16_model_prepared(float_model, tmp_path, capsys):
    source = tmp_path / "bgr_fp16.onnx"
    onnx.save_model(model_variants.float16(model_variants.bgr(float_model)), str(source))
    out = tmp_path / "bgr_fp16_uint8.onnx"
    assert prepare_model.main([str(source), str(out), *IMAGENET_ARGS, "--channel_order", "bgr"]) == 0
    assert "--channel_order bgr now in the graph" in capsys.readouterr().out
    spec = describe_input(onnx.load(str(out)))
    assert spec.is_pipeline_contract and (spec.height, spec.width) == (224, 224)
    batch = crops(224, 224)[:2]
    reference = run(wrap(float_model, Preprocessing(IMAGENET_MEAN, IMAGENET_STD)), batch)
    got = run(onnx.load(str(out)), batch)
    np.testing.assert_allclose(got.astype(np.float32), reference, atol=0.1, rtol=0)


def test_model_with_weights_in_a_side_file(float_model, tmp_path):
    """Exporters write models over 2 GiB with their weights beside them; the weights are read along."""
    folder = tmp_path / "export"
    folder.mkdir()
    # save_model moves the weights out of the proto it is given: save a copy.
    onnx.save_model(model_variants.copy(float_model), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    assert (folder / "model.onnx").stat().st_size < 1_000_000
    out = tmp_path / "prepared.onnx"
    assert prepare_model.main([str(folder / "model.onnx"), str(out), *IMAGENET_ARGS]) == 0
    assert out.stat().st_size > 18_000_000  # the weights are inside: the pipeline loads one file


def test_uint8_model_is_written_unchanged(model_path, tmp_path, capsys):
    out = tmp_path / "same.onnx"
    assert prepare_model.main([model_path, str(out)]) == 0
    assert "input images: uint8 NHWC (N, 224, 224, 3) RGB (input unchanged)" in capsys.readouterr().out
    assert onnx.load(str(out)).graph == onnx.load(model_path).graph
    assert prepare_model.main([model_path, str(out), *IMAGENET_ARGS]) == 2
    assert "normalises them itself; drop --mean and --std" in capsys.readouterr().err
