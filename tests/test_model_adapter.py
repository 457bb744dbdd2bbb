"""Users' own models fitted to the pipeline's uint8 input: the real EfficientNet-Lite0 exports and its
variants (tests/model_variants.py) on the demo's real photos, run with ONNX Runtime."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engines.activations import apply_activation
from engines.base import EngineError, UsageError
from engines.model_adapter import (IMAGENET_FLAGS, IMAGENET_MEAN, IMAGENET_STD, INPUT_ADAPTER_KEY, InputSpec,
                                   Preprocessing, describe_input, final_activation, load_model, preprocess,
                                   record_activation, resolve_activation, wrap)
from tests import model_variants
from tests.conftest import CAT_CLASSES, ESPRESSO_OR_CUP
from tests.model_variants import SOURCES, crops, run

IMAGENET = Preprocessing(IMAGENET_MEAN, IMAGENET_STD)
IMAGENET_BGR = Preprocessing(IMAGENET_MEAN, IMAGENET_STD, "bgr")


@pytest.fixture(scope="module")
def float_model() -> onnx.ModelProto:
    return model_variants.load_float_model()


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return crops(224, 224)


@pytest.fixture(scope="module")
def reference_logits(float_model, batch) -> np.ndarray:
    """The original float model fed numpy-preprocessed photos: what a torchvision user computes."""
    return run(float_model, preprocess(batch, describe_input(float_model), IMAGENET))


def test_describe_input_reads_layout_dtype_and_size(float_model, model_path):
    assert describe_input(float_model) == InputSpec("images", "NCHW", np.float32, 224, 224, 3, None)
    shipped = describe_input(onnx.load(model_path))
    assert shipped == InputSpec("images", "NHWC", np.uint8, 224, 224) and shipped.is_pipeline_contract
    nhwc = describe_input(model_variants.nhwc(float_model))
    assert (nhwc.layout, nhwc.dtype, nhwc.is_pipeline_contract) == ("NHWC", np.float32, False)
    assert describe_input(model_variants.float16(float_model)).dtype == np.float16
    wide = describe_input(model_variants.resized(float_model, 240, 320))
    assert (wide.height, wide.width) == (240, 320) and wide.describe() == "images: float32 NCHW (N, 3, 240, 320)"


def test_wrapped_float_export_agrees_with_the_shipped_uint8_model(float_model, model_path, batch):
    wrapped = wrap(float_model, IMAGENET, "efficientnet_lite0_float32_nchw.onnx")
    onnx.checker.check_model(wrapped)
    spec = describe_input(wrapped)
    assert spec.is_pipeline_contract and (spec.height, spec.width, spec.batch) == (224, 224, None)
    got, shipped = run(wrapped, batch), run(onnx.load(model_path), batch)
    # The shipped model folds the normalisation into (x - 255 mean) / (255 std): float rounding apart.
    np.testing.assert_allclose(got, shipped, atol=1e-3, rtol=0)
    assert got.argmax(1).tolist() == shipped.argmax(1).tolist()
    top1 = dict(zip(SOURCES, got.argmax(1).tolist()))
    assert top1["chelsea"] in CAT_CLASSES and top1["coffee"] in ESPRESSO_OR_CUP


def test_torch_export_as_users_write_it(model_path, batch):
    """torch's default exporter: opset 18+, its own op choices, weights in a file beside the model."""
    export = model_variants.load_torch_export()
    assert describe_input(export) == InputSpec("input", "NCHW", np.float32, 224, 224, 3, None)
    wrapped = wrap(export, IMAGENET, "efficientnet_lite0_torch_export.onnx")
    onnx.checker.check_model(wrapped)
    got, shipped = run(wrapped, batch), run(onnx.load(model_path), batch)
    np.testing.assert_allclose(got, shipped, atol=1e-3, rtol=0)
    assert got.argmax(1).tolist() == shipped.argmax(1).tolist()
    assert resolve_activation(wrapped, "output") == "softmax"


def test_wrapped_model_matches_the_original_fed_numpy_preprocessing(float_model, batch, reference_logits):
    wrapped = wrap(float_model, IMAGENET)
    np.testing.assert_allclose(run(wrapped, batch), reference_logits, atol=1e-3, rtol=0)
    # The same flags with another mean are a different model input: the comparison can fail.
    other = wrap(float_model, Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert np.abs(run(other, batch) - reference_logits).max() > 0.5


def test_wrapping_keeps_outputs_and_labels_and_records_the_flags(float_model):
    wrapped = wrap(float_model, IMAGENET_BGR)
    assert [v.name for v in wrapped.graph.output] == ["logits"]
    meta = {p.key: p.value for p in wrapped.metadata_props}
    assert meta["labels"] == {p.key: p.value for p in float_model.metadata_props}["labels"]
    assert json.loads(meta[INPUT_ADAPTER_KEY]) == {
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "channel_order": "bgr", "input": "images_uint8",
        "model_input": "images: float32 NCHW (N, 3, 224, 224)"}
    assert len(float_model.graph.node) == len(wrapped.graph.node) - 10  # the original is left alone
    # Prepared once, the model takes the same flags again, or none, as it is.
    assert wrap(wrapped, IMAGENET_BGR) is wrapped and wrap(wrapped, Preprocessing()) is wrapped
    with pytest.raises(UsageError, match=r"prepared.onnx was prepared with --mean 0.485,0.456,0.406 --std "
                                         r"0.229,0.224,0.225 --channel_order bgr .* and --mean 0.485,0.456,0.406 "
                                         r"--std 0.229,0.224,0.225 was passed"):
        wrap(wrapped, IMAGENET, "prepared.onnx")


def test_bgr_model_wrapped_with_bgr_equals_the_rgb_model(float_model, batch, reference_logits):
    bgr_model = model_variants.bgr(float_model)
    np.testing.assert_allclose(run(wrap(bgr_model, IMAGENET_BGR), batch), reference_logits, atol=1e-3, rtol=0)
    # Fed RGB, the BGR model sees another picture: the channel order matters on these photos.
    assert np.abs(run(wrap(bgr_model, IMAGENET), batch) - reference_logits).max() > 0.5


def test_nhwc_float_model_gets_no_transpose(float_model, batch, reference_logits):
    wrapped = wrap(model_variants.nhwc(float_model), IMAGENET)
    added = [n.op_type for n in wrapped.graph.node if n.name.startswith("input_adapter/")]
    assert added == ["Cast", "Constant", "Div", "Constant", "Sub", "Constant", "Div"]
    np.testing.assert_allclose(run(wrapped, batch), reference_logits, atol=1e-3, rtol=0)


def test_float16_model_is_fed_float16(float_model, batch, reference_logits):
    half = model_variants.float16(float_model)
    wrapped = wrap(half, IMAGENET)
    added = [n for n in wrapped.graph.node if n.name.startswith("input_adapter/")]
    assert [(n.op_type, n.attribute[0].i) for n in added if n.op_type == "Cast"] == [
        ("Cast", TensorProto.FLOAT), ("Cast", TensorProto.FLOAT16)]
    got = run(wrapped, batch)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, run(half, preprocess(batch, describe_input(half), IMAGENET)))
    # float16 weights and activations: logits within 0.1 of float32, the same top-1.
    np.testing.assert_allclose(got.astype(np.float32), reference_logits, atol=0.1, rtol=0)
    assert got.argmax(1).tolist() == reference_logits.argmax(1).tolist()


def test_non_square_input_follows_the_model(float_model):
    wide = model_variants.resized(float_model, 240, 320)
    wrapped = wrap(wide, IMAGENET)
    spec = describe_input(wrapped)
    assert (spec.layout, spec.height, spec.width) == ("NHWC", 240, 320)
    batch = crops(240, 320)
    got = run(wrapped, batch)
    np.testing.assert_allclose(got, run(wide, preprocess(batch, describe_input(wide), IMAGENET)), atol=1e-3, rtol=0)
    assert got.argmax(1)[SOURCES.index("chelsea")] in CAT_CLASSES
    with pytest.raises(EngineError, match=r"Received shape \(5, 224, 224, 3\), dimension 1 is 224. "
                                          r"Note: Expected images_uint8: uint8\[N, 240, 320, 3\]"):
        run(wrapped, crops(224, 224))


def test_softmax_ended_model_is_not_softmaxed_again(float_model, batch, reference_logits):
    model = model_variants.softmax_ended(float_model)
    assert final_activation(model, "probs") == "softmax"
    assert resolve_activation(model, "probs") == "none"
    probs = apply_activation(run(wrap(model, IMAGENET), batch), "none")
    np.testing.assert_allclose(probs, apply_activation(reference_logits, "softmax"), atol=1e-5, rtol=0)
    coffee = SOURCES.index("coffee")
    assert probs[coffee].max() > 0.5
    # What the pipeline did before: a second softmax squashes the espresso's score to about 1/1000.
    assert apply_activation(probs, "softmax")[coffee].max() < 0.01
    with pytest.raises(UsageError, match=r"--activation softmax: output 'probs' of probs.onnx already ends in "
                                         r"Softmax.*pass --activation auto or none"):
        resolve_activation(model, "probs", "softmax", "probs.onnx")


def test_sigmoid_head_scores_each_class_alone(float_model, batch, reference_logits):
    model = model_variants.sigmoid_ended(float_model)
    assert final_activation(model, "scores") == "sigmoid"
    assert resolve_activation(model, "scores") == "none"
    scores = run(wrap(model, IMAGENET), batch)
    np.testing.assert_allclose(scores, apply_activation(reference_logits, "sigmoid"), atol=1e-5, rtol=0)
    assert (scores.sum(axis=1) > 1.5).all()  # independent scores, not a distribution
    # A multi-label head that ends in logits: the user asks for sigmoid.
    assert final_activation(float_model, "logits") is None
    assert resolve_activation(float_model, "logits", "sigmoid") == "sigmoid"


def test_auto_activation_reads_the_graph_then_says_what_it_chose(float_model, caplog):
    with caplog.at_level(logging.INFO, logger="engines.model_adapter"):
        assert resolve_activation(float_model, "logits", source="model.onnx") == "softmax"
    assert ("activation softmax for output 'logits' of model.onnx: its graph ends in no Softmax or Sigmoid"
            in caplog.text)
    assert resolve_activation(float_model, "logits", "none") == "none"
    with pytest.raises(UsageError, match=r"--activation must be one of \['auto', 'softmax', 'sigmoid', 'none'\]"):
        resolve_activation(float_model, "logits", "relu")
    with pytest.raises(EngineError, match=r"Output tensor: probs \| not an output of the model "
                                          r"\(outputs: \['logits'\]"):
        final_activation(float_model, "probs")


def test_recorded_activation_wins_over_the_graph(float_model):
    model = wrap(float_model, IMAGENET)
    record_activation(model, "logits", "sigmoid")
    assert resolve_activation(model, "logits") == "sigmoid"
    assert resolve_activation(model, "logits", "none") == "none"
    with pytest.raises(UsageError, match="record_activation takes softmax, sigmoid or none, got 'auto'"):
        record_activation(model, "logits", "auto")


def _head(*ops):
    """A tiny model: x float [N, 4] -> ops in a row -> y."""
    nodes, tensor = [], "x"
    for i, (op, attrs) in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        inputs = [tensor, "shape"] if op == "Reshape" else [tensor]
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        tensor = out
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("ops, expected", [
    ([("Softmax", {"axis": 1}), ("Reshape", {}), ("Identity", {})], "softmax"),
    ([("Sigmoid", {}), ("Cast", {"to": TensorProto.FLOAT})], "sigmoid"),
    ([("LogSoftmax", {"axis": 1})], None),  # softmax(log p) = p: the pipeline's softmax is right
    ([("Softmax", {"axis": 1}), ("Relu", {})], None),
])
def test_final_activation_looks_through_value_preserving_ops(ops, expected):
    assert final_activation(_head(*ops), "y") == expected


def test_float_model_without_mean_and_std_is_refused_naming_the_flags(float_model):
    with pytest.raises(UsageError, match=r"my_model.onnx takes float32 input \(images: float32 NCHW \(N, 3, 224, "
                                         r"224\)\), normalised outside the model: pass the mean and std it was "
                                         r"trained with, on the 0-1 scale, e.g. --mean 0.485,0.456,0.406 --std "
                                         r"0.229,0.224,0.225 for ImageNet-trained torchvision/timm models"):
        wrap(float_model, Preprocessing(), "my_model.onnx")
    with pytest.raises(UsageError, match="takes float16 input"):
        wrap(model_variants.float16(float_model), Preprocessing(channel_order="bgr"))


def test_numpy_reference_checks_the_same_flags(float_model, model_path, batch):
    with pytest.raises(UsageError, match=r"the reference takes float32 input .* e.g. --mean 0.485,0.456,0.406"):
        preprocess(batch, describe_input(float_model), Preprocessing(), "the reference")
    with pytest.raises(UsageError, match="normalises them itself; drop --mean and --std"):
        preprocess(batch, describe_input(onnx.load(model_path)), IMAGENET)
    with pytest.raises(EngineError, match=r"preprocess takes a uint8 \(N, H, W, 3\) RGB batch, got float32"):
        preprocess(batch.astype(np.float32), describe_input(float_model), IMAGENET)


def test_uint8_nhwc_model_passes_through_unchanged(model_path):
    shipped = onnx.load(model_path)
    before = shipped.SerializeToString()
    assert wrap(shipped, Preprocessing(), "efficientnet_lite0.onnx") is shipped
    assert shipped.SerializeToString() == before
    with pytest.raises(UsageError, match=r"efficientnet_lite0.onnx takes uint8 images \(images: uint8 NHWC "
                                         r"\(N, 224, 224, 3\)\) and normalises them itself; drop --mean and --std"):
        wrap(shipped, IMAGENET, "efficientnet_lite0.onnx")


def test_uint8_model_trained_on_bgr_gets_only_the_swap(model_path, batch):
    shipped = onnx.load(model_path)
    wrapped = wrap(shipped, Preprocessing(channel_order="bgr"))
    assert [n.op_type for n in wrapped.graph.node if n.name.startswith("input_adapter/")] == ["Constant", "Gather"]
    np.testing.assert_array_equal(run(wrapped, batch), run(shipped, np.ascontiguousarray(batch[..., ::-1])))


@pytest.mark.parametrize("mean, std, message", [
    ("0.485,0.456,0.406", None, "--mean was given without --std: pass both"),
    (None, "0.229,0.224,0.225", "--std was given without --mean: pass both"),
    ("0.485,0.456", "0.229,0.224,0.225", "--mean takes 3 numbers R,G,B .*, got 0.485,0.456"),
    ("0.485;0.456;0.406", "1,1,1", "--mean takes 3 comma-separated numbers R,G,B .*, got '0.485;0.456;0.406'"),
    ("123.675,116.28,103.53", "58.395,57.12,57.375",
     "--mean 123.675,116.28,103.53 looks like the 0-255 scale; pass it on the 0-1 scale torchvision documents: "
     "--mean 0.485,0.456,0.406"),
    ("0.5,0.5,0.5", "0.5,0,0.5", r"--std values must be > 0, got 0.5,0,0.5"),
])
def test_flags_are_checked_once(mean, std, message):
    with pytest.raises(UsageError, match=message):
        Preprocessing.from_flags(mean, std)


def test_flags_print_back_as_given():
    assert Preprocessing.from_flags("0.485,0.456,0.406", "0.229,0.224,0.225", "bgr").flags() == \
        IMAGENET_FLAGS + " --channel_order bgr"
    with pytest.raises(UsageError, match=r"--channel_order must be one of \['rgb', 'bgr'\], got 'BGR'"):
        Preprocessing(channel_order="BGR")


def _image_input(elem_type, dims, inputs=1):
    values = [helper.make_tensor_value_info(f"x{i}", elem_type, dims) for i in range(inputs)]
    y = helper.make_tensor_value_info("y", elem_type, dims)
    graph = helper.make_graph([helper.make_node("Identity", ["x0"], ["y"])], "g", values, [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("elem_type, dims, inputs, message", [
    (TensorProto.FLOAT, ["N", 3, 224, 224], 2, r"odd.onnx has 2 inputs \(\['x0', 'x1'\]\); the image pipeline "
                                               r"feeds one image input"),
    (TensorProto.FLOAT, ["N", 1, 224, 224], 1, r"Input tensor: x0 of odd.onnx \| shape \('\?', 1, 224, 224\) has no "
                                               r"3-channel axis"),
    (TensorProto.FLOAT, ["N", 150528], 1, r"shape \('\?', 150528\) is not an image batch"),
    (TensorProto.DOUBLE, ["N", 3, 224, 224], 1, r"Received unexpected dtype: DOUBLE. Note: Expected type: FLOAT, "
                                                r"FLOAT16 or UINT8"),
])
def test_inputs_that_are_not_images_are_refused(elem_type, dims, inputs, message):
    with pytest.raises(EngineError, match=message):
        describe_input(_image_input(elem_type, dims, inputs), "odd.onnx")


def test_fixed_batch_and_dynamic_size_are_kept():
    model = _image_input(TensorProto.FLOAT, [1, 3, "height", "width"])
    spec = describe_input(model)
    assert (spec.batch, spec.height, spec.width) == (1, None, None)
    wrapped = wrap(model, IMAGENET)
    dims = wrapped.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == [1, "height", "width", 3]
    onnx.checker.check_model(wrapped)


def test_load_model_reads_the_weights_an_exporter_wrote_beside_it(float_model, tmp_path):
    # torch.onnx.export (torch >= 2.9) writes model.onnx plus model.onnx.data, even for small models.
    path = tmp_path / "model.onnx"
    # save_model moves the weights out of the proto it is given: save a copy.
    onnx.save_model(model_variants.copy(float_model), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    loaded = load_model(str(path))
    assert loaded.graph == float_model.graph
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(EngineError, match=r"Model file's weights file \(written beside .*model.onnx by its "
                                          r"exporter\) not found: .*model.onnx.data"):
        load_model(str(path))
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(EngineError, match=r"--model .*text.onnx is not an ONNX model \(11 bytes\)"):
        load_model(str(tmp_path / "text.onnx"), "--model")


def test_weights_files_must_lie_beside_the_model_and_hold_every_tensor(tmp_path):
    from onnx.external_data_helper import convert_model_to_external_data

    model = model_variants.load_float_model()
    convert_model_to_external_data(model, location="weights.data", size_threshold=0)
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    assert load_model(str(tmp_path / "m.onnx")).graph.initializer[0].raw_data  # whole, from beside it
    data = (tmp_path / "weights.data").read_bytes()
    (tmp_path / "weights.data").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match=r"the weights file is truncated or belongs to another export"):
        load_model(str(tmp_path / "m.onnx"))
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere/weights.data"
    (tmp_path / "up.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(EngineError, match=r"names its weights file '../elsewhere/weights.data', which is not a file"):
        load_model(str(tmp_path / "up.onnx"))
