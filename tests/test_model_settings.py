"""The model's settings (pipelines/model_settings.py), and the job run on real models as users bring them.

Every job here runs the real EfficientNet-Lite0 (the shipped uint8 model, or a variant of the
project's float32 NCHW export made by ``tests/model_variants.py``) on the demo photos saved as PNG,
so the pipeline's crops are exactly ``model_variants.crops`` and an output can be compared with
ONNX Runtime run on the original model.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from engines.activations import apply_activation
from engines.base import UsageError
from engines.model_adapter import IMAGENET_MEAN, IMAGENET_STD, BuiltModel, Preprocessing, describe_input, preprocess
from pipelines import model_settings
from pipelines.classify_images import main, run
from pipelines.settings import ClassifyOptions
from tests import model_variants
from pipelines.partitions import committed_files
from tests.conftest import CAT_CLASSES, photo
from tests.model_variants import SOURCES, crops

IMAGENET = Preprocessing(IMAGENET_MEAN, IMAGENET_STD)
IMAGENET_FLAGS = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
ESPRESSO = 967


def _options(*flags):
    return ClassifyOptions(["--input", "x", "--output", "y", *flags])


# --- flags and their resolution -------------------------------------------------------------------

def test_crop_takes_a_side_or_height_x_width():
    assert model_settings.parse_crop("224") == (224, 224)
    assert model_settings.parse_crop("240x320") == (240, 320)
    for bad in ("x", "240x", "1x2x3", "0", "20000"):
        with pytest.raises(UsageError, match="--crop"):
            model_settings.parse_crop(bad)


def test_crop_and_resize_follow_the_model_unless_given():
    assert model_settings.crop_and_resize(_options(), None)[:2] == ((224, 224), 256)
    assert model_settings.crop_and_resize(_options(), (240, 240))[:2] == ((240, 240), 275)
    assert model_settings.crop_and_resize(_options(), (240, 320))[:2] == ((240, 320), 366)
    assert model_settings.crop_and_resize(_options("--resize", "300"), (240, 320))[:2] == ((240, 320), 300)
    assert model_settings.crop_and_resize(_options("--crop", "160"), None)[:2] == ((160, 160), 183)
    with pytest.raises(UsageError, match=r"--crop 224 does not fit the model: it takes 240 x 320 images .*"
                                         r"pass --crop 240x320, or leave --crop out"):
        model_settings.crop_and_resize(_options("--crop", "224"), (240, 320))


def test_each_side_of_the_crop_is_checked_against_the_models_own():
    def crop(flag, size):
        return model_settings.crop_and_resize(_options(*(["--crop", flag] if flag else [])), size)[0]

    assert crop("240x320", (240, None)) == (240, 320) and crop(None, (240, None)) == (240, 240)
    assert crop("320x240", (None, None)) == (320, 240) and crop(None, (None, 160)) == (160, 160)
    # Height and width swapped: each side compared with its own.
    with pytest.raises(UsageError, match=r"it takes 240 x 320 images \(height x width; height 320 is not 240, width "
                                         r"240 is not 320\); pass --crop 240x320"):
        crop("320x240", (240, 320))
    with pytest.raises(UsageError, match=r"it takes any x 224 images \(height x width; width 320 is not 224\); pass "
                                         r"--crop 240x224"):
        crop("240x320", (None, 224))


def _float_file(tmp_path, model=None, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model if model is not None else model_variants.load_float_model(), str(path))
    return str(path)


def test_a_float_model_needs_mean_and_std_and_gets_them_in_its_graph(tmp_path):
    from engines.flags import ModelFile

    path = _float_file(tmp_path)
    with pytest.raises(UsageError, match=r"takes float32 input .* pass the mean and std .*--mean 0.485,0.456,0.406"):
        model_settings.resolve_model(_options(), ModelFile(path, "--model"))
    settings = model_settings.resolve_model(_options(*IMAGENET_FLAGS), ModelFile(path, "--model"))
    assert settings.wrapped and settings.input.layout == "NCHW" and settings.input_size() == (224, 224)
    assert settings.activation == "softmax" and settings.output_names == ("logits",)
    assert settings.identity == f"model.onnx@sha256:{settings.sha256[:12]}"
    assert model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--model_version", "v7"),
                                        ModelFile(path, "--model")).identity == "v7"


def test_raw_mode_writes_every_output_unless_named_and_refuses_outputs_named_like_row_fields(tmp_path):
    from engines.flags import ModelFile

    path = _float_file(tmp_path)
    raw = model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_mode", "raw"), ModelFile(path, "--model"))
    assert raw.outputs == (model_settings.OutputSpec("logits", "float32", 1000),) and raw.activation == "none"
    with pytest.raises(UsageError, match=r"--output_name 'emb' is not an output of .*\['logits'\]"):
        model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_mode", "raw", "--output_name", "emb"),
                                     ModelFile(path, "--model"))
    clash = model_variants.copy(model_variants.load_float_model())
    for node in clash.graph.node:
        node.output[:] = ["uri" if o == "logits" else o for o in node.output]
    clash.graph.output[0].name = "uri"
    with pytest.raises(UsageError, match=r"writes output 'uri' in a field of that name"):
        model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_mode", "raw"),
                                     ModelFile(_float_file(tmp_path, clash, "clash.onnx"), "--model"))


def test_a_plan_takes_its_input_and_activation_from_what_its_sidecar_recorded():
    uint8 = (("images", "UINT8", (-1, 224, 224, 3)),)
    outputs = (("probs", "FLOAT", (-1, 1000)),)
    built = BuiltModel("gs://b/m.plan", uint8, outputs, activations={"probs": "none"},
                       final_activations={"probs": "softmax"}, sha256="ab" * 32)
    settings = model_settings.resolve_model(_options("--engine", "tensorrt", "--engine_path", "gs://b/m.plan"),
                                            None, built)
    assert settings.activation == "none" and settings.output_names == ("probs",)
    assert settings.identity == "m.plan@sha256:abababababab" and settings.input_size() == (224, 224)
    with pytest.raises(UsageError, match="already ends in Softmax"):
        model_settings.resolve_model(_options("--activation", "softmax"), None, built)
    with pytest.raises(UsageError, match=r"a plan runs as it was built"):
        model_settings.resolve_model(_options(*IMAGENET_FLAGS), None, built)
    float_plan = BuiltModel("m.plan", (("input", "FLOAT", (-1, 3, 224, 224)),), outputs)
    with pytest.raises(UsageError, match=r"build it from a prepared model \(python -m model_tools.prepare_model"):
        model_settings.resolve_model(_options(), None, float_plan)
    prepared = BuiltModel("m.plan", uint8, outputs, preprocessing=Preprocessing(IMAGENET.mean, IMAGENET.std))
    resolved = model_settings.resolve_model(_options(*IMAGENET_FLAGS), None, prepared)
    assert resolved.preprocessing == prepared.preprocessing


# --- jobs on real models --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The demo photos as PNG (lossless: the pipeline's crops equal ``model_variants.crops``)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    for name in SOURCES:
        Image.fromarray(photo(name)).convert("RGB").save(folder / f"{name}.png")
    return str(folder)


def _job(photos, out, *flags):
    """Runs the job; returns (stats, rows by photo name)."""
    stats = run(["--input", photos, "--output", str(out), "--batch_size", "4", "--progress_every_s", "0", *flags])
    assert stats["inputs"] == len(SOURCES) == stats["predictions"] and stats["unaccounted"] == 0
    rows = {}
    for path in committed_files(str(out), "predictions"):
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            found = pq.read_table(path).to_pylist()
        else:
            found = [json.loads(line) for line in open(path)]
        rows.update({os.path.basename(r["uri"]).rsplit(".", 1)[0]: r for r in found})
    return stats, rows


def _top1(rows):
    return {name: row["top_k"][0]["class_id"] for name, row in rows.items()}


@pytest.fixture(scope="module")
def shipped(photos, tmp_path_factory, model_path):
    """The shipped uint8 model's rows on the photos: what every float variant must agree with."""
    return _job(photos, tmp_path_factory.mktemp("shipped") / "out")[1]


@pytest.fixture()
def float_model(tmp_path):
    return _float_file(tmp_path, name="efficientnet_float.onnx")


def test_the_float_export_with_imagenet_flags_scores_as_the_shipped_model(photos, shipped, float_model, tmp_path):
    stats, rows = _job(photos, tmp_path / "out", "--model", float_model, *IMAGENET_FLAGS)
    assert _top1(rows) == _top1(shipped) and _top1(rows)["coffee"] == ESPRESSO
    assert CAT_CLASSES & {_top1(rows)["chelsea"]}
    for name in SOURCES:
        np.testing.assert_allclose([c["score"] for c in rows[name]["top_k"]],
                                   [c["score"] for c in shipped[name]["top_k"]], atol=2e-3)
    model = stats["settings"]["model"]
    assert model["preprocessing"]["in_graph"] and model["input"] == "images: float32 NCHW (N, 3, 224, 224)"
    identity = f"efficientnet_float.onnx@sha256:{model['sha256'][:12]}"
    assert model["identity"] == identity and {r["model"] for r in rows.values()} == {identity}
    success = json.load(open(tmp_path / "out" / "_SUCCESS"))
    assert success["model"]["identity"] == identity and success["model"]["sha256"] == model["sha256"]


def test_a_float_model_without_flags_stops_at_start_naming_them(photos, float_model, tmp_path, capsys):
    assert main(["--input", photos, "--output", str(tmp_path / "o"), "--model", float_model]) == 2
    assert "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_model_ending_in_softmax_is_not_softmaxed_again(photos, shipped, tmp_path, capsys):
    path = _float_file(tmp_path, model_variants.softmax_ended(model_variants.load_float_model()))
    stats, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS)
    assert stats["settings"]["model"]["activation"] == "none"
    assert stats["settings"]["model"]["activation_choice"] == "auto: the graph ends in Softmax"
    assert rows["coffee"]["top_k"][0]["score"] > 0.8  # 0.0023 when softmaxed twice
    for name in SOURCES:
        np.testing.assert_allclose([c["score"] for c in rows[name]["top_k"]],
                                   [c["score"] for c in shipped[name]["top_k"]], atol=2e-3)
    assert main(["--input", photos, "--output", str(tmp_path / "twice"), "--model", path, *IMAGENET_FLAGS,
                 "--activation", "softmax"]) == 2
    assert "already ends in Softmax" in capsys.readouterr().err


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_raw_outputs_match_onnx_runtime_on_the_original_model(photos, float_model, tmp_path, output_format):
    original = model_variants.load_float_model()
    batch = crops(224, 224)
    want = model_variants.run(original, preprocess(batch, describe_input(original), IMAGENET))
    stats, rows = _job(photos, tmp_path / "out", "--model", float_model, *IMAGENET_FLAGS, "--output_mode", "raw",
                       "--output_format", output_format)
    assert stats["settings"]["model"]["output_mode"] == "raw"
    for i, name in enumerate(SOURCES):
        assert set(rows[name]) == {"uri", "id", "model", "logits"} if output_format == "parquet" else \
            set(rows[name]) == {"uri", "model", "logits"}
        np.testing.assert_allclose(rows[name]["logits"], want[i], atol=1e-3, rtol=0)
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(committed_files(str(tmp_path / "out"), "predictions")[0])
        assert schema.field("logits").type == pa.list_(pa.float32(), 1000)


def test_a_bgr_model_runs_with_channel_order_bgr(photos, shipped, tmp_path):
    path = _float_file(tmp_path, model_variants.bgr(model_variants.load_float_model()))
    _, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS, "--channel_order", "bgr")
    assert _top1(rows) == _top1(shipped)


def test_an_nhwc_float_model_runs(photos, shipped, tmp_path):
    path = _float_file(tmp_path, model_variants.nhwc(model_variants.load_float_model()))
    stats, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS)
    assert "float32 NHWC (N, 224, 224, 3)" in stats["settings"]["model"]["input"]
    assert _top1(rows) == _top1(shipped)


def test_a_float16_model_runs_and_writes_float16_raw_outputs(photos, shipped, tmp_path):
    path = _float_file(tmp_path, model_variants.float16(model_variants.load_float_model()))
    _, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS)
    assert _top1(rows) == _top1(shipped)
    import pyarrow as pa
    import pyarrow.parquet as pq

    _job(photos, tmp_path / "raw", "--model", path, *IMAGENET_FLAGS, "--output_mode", "raw",
         "--output_format", "parquet")
    schema = pq.read_schema(committed_files(str(tmp_path / "raw"), "predictions")[0])
    assert schema.field("logits").type == pa.list_(pa.float16(), 1000)


def test_a_240_input_sets_the_crop_and_resize(photos, tmp_path):
    path = _float_file(tmp_path, model_variants.resized(model_variants.load_float_model(), 240, 240))
    stats, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS)
    assert (stats["settings"]["model"]["input"]) == "images: float32 NCHW (N, 3, 240, 240)"
    assert _top1(rows)["coffee"] == ESPRESSO and CAT_CLASSES & {_top1(rows)["chelsea"]}


def test_a_sigmoid_head_with_a_threshold_writes_every_class_at_or_above_it(photos, float_model, tmp_path):
    path = _float_file(tmp_path, model_variants.sigmoid_ended(model_variants.load_float_model()))
    original = model_variants.load_float_model()
    logits = model_variants.run(original, preprocess(crops(224, 224), describe_input(original), IMAGENET))
    scores = apply_activation(logits, "sigmoid")
    threshold = 0.75
    stats, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS, "--output_name", "scores",
                       "--threshold", str(threshold))
    assert stats["settings"]["model"]["activation"] == "none" and stats["settings"]["model"]["threshold"] == threshold
    for i, name in enumerate(SOURCES):
        want = sorted(np.flatnonzero(scores[i] >= threshold).tolist(), key=lambda c: -scores[i][c])
        got = rows[name]["classes"]
        assert "top_k" not in rows[name]
        assert [c["class_id"] for c in got] == want, name
        np.testing.assert_allclose([c["score"] for c in got], scores[i][want], atol=1e-3)
    assert any(len(rows[n]["classes"]) > 1 for n in SOURCES)  # multi-label: more than one class in some row


def test_dali_cpu_and_cpu_decoding_give_the_same_rows_for_a_float_model(photos, float_model, tmp_path):
    """The GPU decode path (``--decode gpu`` runs this graph on the GPU) with the conversion in the graph."""
    runs = {mode: _job(photos, tmp_path / mode, "--model", float_model, *IMAGENET_FLAGS, "--decode", mode)[1]
            for mode in ("dali_cpu", "cpu")}
    assert _top1(runs["dali_cpu"]) == _top1(runs["cpu"])
    for name in SOURCES:
        np.testing.assert_allclose(runs["dali_cpu"][name]["top_k"][0]["score"], runs["cpu"][name]["top_k"][0]["score"],
                                   atol=0.05)


def test_a_240_x_320_input_is_cropped_to_its_shape_by_pillow_and_dali_alike(photos, tmp_path):
    path = _float_file(tmp_path, model_variants.resized(model_variants.load_float_model(), 240, 320))
    runs = {mode: _job(photos, tmp_path / mode, "--model", path, *IMAGENET_FLAGS, "--decode", mode)
            for mode in ("cpu", "dali_cpu")}
    stats, rows = runs["cpu"]
    assert stats["settings"]["model"]["input"] == "images: float32 NCHW (N, 3, 240, 320)"
    assert _top1(rows)["coffee"] == ESPRESSO and CAT_CLASSES & {_top1(rows)["chelsea"]}
    assert _top1(runs["dali_cpu"][1]) == _top1(rows)


def test_skip_scored_counts_only_partitions_the_same_model_and_rows_made(photos, tmp_path):
    """A partition another model (or another output mode) made holds other results: its inputs are scored again."""
    root = tmp_path / "scored"
    _job(photos, root / "dt=1")
    stats = run(["--input", photos, "--output", str(root / "dt=2"), "--skip_scored", str(root), "--batch_size", "4",
                 "--progress_every_s", "0"])
    assert stats["skipped"] == len(SOURCES) and stats["predictions"] == 0  # the same model and rows: skipped
    raw = run(["--input", photos, "--output", str(root / "dt=3"), "--skip_scored", str(root), "--batch_size", "4",
               "--progress_every_s", "0", "--output_mode", "raw"])
    assert raw["skipped"] == 0 and raw["predictions"] == len(SOURCES)
    versioned = run(["--input", photos, "--output", str(root / "dt=4"), "--skip_scored", str(root), "--batch_size",
                     "4", "--progress_every_s", "0", "--model_version", "v2"])
    assert versioned["skipped"] == 0 and versioned["predictions"] == len(SOURCES)


def test_outputs_that_cannot_rank_or_write_are_refused_at_start(tmp_path):
    from engines.flags import ModelFile
    from onnx import TensorProto, helper

    model = model_variants.load_float_model()
    graph = model.graph
    graph.node.append(helper.make_node("ReduceMax", ["logits"], ["best"], keepdims=0, axes=[1]) if
                      model.opset_import[0].version < 18 else
                      helper.make_node("ReduceMax", ["logits", "best_axes"], ["best"], keepdims=0))
    if model.opset_import[0].version >= 18:
        graph.initializer.append(helper.make_tensor("best_axes", TensorProto.INT64, [1], [1]))
    graph.output.append(helper.make_tensor_value_info("best", TensorProto.FLOAT, ["N"]))
    graph.output.append(helper.make_tensor_value_info("logits_any", TensorProto.FLOAT, None))
    graph.node.append(helper.make_node("Identity", ["logits"], ["logits_any"]))
    path = ModelFile(_float_file(tmp_path, model, "two_heads.onnx"), "--model")
    with pytest.raises(UsageError, match=r"one value per image, and softmax over one value is always 1.0"):
        model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_name", "best"), path)
    assert model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_name", "best", "--activation",
                                                 "sigmoid"), path).activation == "sigmoid"
    raw = model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_mode", "raw"), path)
    assert {o.name: o.size for o in raw.outputs} == {"logits": 1000, "best": 1, "logits_any": None}
    with pytest.raises(UsageError, match=r"--threshold 0.5 compares probabilities"):
        model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--threshold", "0.5", "--activation", "none"), path)
    with pytest.raises(UsageError, match=r"output 'Model' in a field of that name"):
        clash = model_variants.copy(model)
        clash.graph.output[0].name = "Model"
        for node in clash.graph.node:
            node.output[:] = ["Model" if o == "logits" else o for o in node.output]
            node.input[:] = ["Model" if i == "logits" else i for i in node.input]
        model_settings.resolve_model(_options(*IMAGENET_FLAGS, "--output_mode", "raw"),
                                     ModelFile(_float_file(tmp_path, clash, "clash.onnx"), "--model"))


def test_fp16_of_a_float16_model_loads_it_as_it_is(photos, shipped, tmp_path):
    path = _float_file(tmp_path, model_variants.float16(model_variants.load_float_model()))
    _, rows = _job(photos, tmp_path / "out", "--model", path, *IMAGENET_FLAGS, "--precision", "fp16")
    assert _top1(rows) == _top1(shipped)


def test_a_model_replaced_after_launch_is_refused_where_it_loads(tmp_path):
    """Rows name the model the launcher read (its sha256): a worker that finds another file there stops."""
    from engines.base import EngineError
    from pipelines.settings import resolve

    path = _float_file(tmp_path, name="model.onnx")
    settings, _ = resolve(["--input", str(tmp_path), "--output", str(tmp_path / "out"), "--model", path,
                           *IMAGENET_FLAGS], start_checks=False)
    assert settings.recipe.loader.sha256 == settings.model.sha256
    settings.recipe.loader().close()  # the same file loads
    _float_file(tmp_path, model_variants.softmax_ended(model_variants.load_float_model()), "model.onnx")
    with pytest.raises(EngineError, match=r"model.onnx changed after the job was launched"):
        settings.recipe.loader()
