"""Fit a user's ONNX image model to the pipeline's input contract, and say how to read its output.

The pipeline moves only uint8 RGB images ``(N, H, W, 3)`` (README, "Only uint8 travels"); the
project's own export takes them as they are and normalises inside its graph. Models exported
the way torchvision and timm users write them take float32 (or float16) NCHW input normalised
with a mean and std outside the model. :func:`wrap` prepends that conversion to the model's own
graph, so ONNX Runtime and TensorRT fuse it into the first layers, the GPU path stays
device-resident, and every engine sees the same preprocessing::

    uint8 (N, H, W, 3) -> Cast float32 -> Div 255 -> Sub mean -> Div std -> [Gather: RGB -> BGR]
                       -> [Cast float16] -> [Transpose to NCHW] -> the model's own input

The mean and std are given per colour, R,G,B, whatever order the model's channels are in (as
torchvision and timm print them), so the channel swap comes after normalising.

:func:`describe_input` reads the model's input (layout, dtype, size), so resizing and cropping can
follow the model rather than assume 224 x 224. :func:`resolve_activation` decides how scores
are read: softmax, sigmoid or none, where ``auto`` reads the end of the graph, so a model that
already ends in Softmax is not softmaxed twice. The activation is applied by post-processing
(``engines.activations.apply_activation``), not appended to the graph: the engine's outputs stay
the model's own (raw scores and embeddings stay usable), and a validation compares outputs with
the original model's. ``python -m model_tools.prepare_model`` writes the wrapped model with the chosen
activation in its metadata, for offline TensorRT builds.

Everything here works on ``onnx.ModelProto`` with onnx and numpy alone; no inference library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from engines.activations import ACTIVATIONS
from engines.base import EngineError, UsageError, import_optional
from engines.onnx_summary import ONNX_HINT

_LOG = logging.getLogger(__name__)

CHANNEL_ORDERS = ("rgb", "bgr")
#: The flags for models trained on ImageNet with torchvision's or timm's defaults (0-1 scale).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_FLAGS = "--mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"
#: Metadata keys :func:`wrap` and ``prepare_model`` write: the conversion prepended to the graph
#: (JSON), and the activation chosen per output (JSON ``{output name: activation}``).
INPUT_ADAPTER_KEY = "input_adapter"
OUTPUT_ACTIVATION_KEY = "output_activation"
#: Name of the new uint8 input, the pipeline's usual name, unless the model already uses it.
WRAPPED_INPUT_NAME = "images"

# Ops that change neither values nor their meaning: looked through to find a graph's final activation.
_PASS_THROUGH_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")
_FINAL_ACTIVATIONS = {"Softmax": "softmax", "Sigmoid": "sigmoid"}
_PREFIX = "input_adapter/"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The one image input of a model, as read from its graph.

    Attributes:
        name: The input's name.
        layout: "NCHW" or "NHWC".
        dtype: The element type: float32, float16 or uint8.
        height: Rows of the image, None when the model leaves it dynamic.
        width: Columns of the image, None when dynamic.
        channels: Always 3 (a model with another count is refused by :func:`describe_input`).
        batch: The batch dimension when the model fixes it (an export without dynamic axes has
            1), None when dynamic.
    """

    name: str
    layout: str
    dtype: np.dtype
    height: Optional[int]
    width: Optional[int]
    channels: int = 3
    batch: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def is_pipeline_contract(self) -> bool:
        """True when the model takes the pipeline's batches as they are: uint8 NHWC, 3 channels."""
        return self.layout == "NHWC" and self.dtype == np.uint8 and self.channels == 3

    @property
    def shape(self) -> Tuple[Optional[int], ...]:
        """The input's shape in its own layout, None for a dynamic dimension."""
        if self.layout == "NCHW":
            return (self.batch, self.channels, self.height, self.width)
        return (self.batch, self.height, self.width, self.channels)

    def describe(self) -> str:
        dims = ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d))
                         for i, d in enumerate(self.shape))
        return f"{self.name}: {self.dtype} {self.layout} ({dims})"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What a model needs done to 0-255 RGB pixels: the flags ``--mean``, ``--std``, ``--channel_order``.

    Attributes:
        mean: Per-colour mean on the 0-1 scale torchvision documents, R,G,B whatever
            ``channel_order`` is (a config that lists BGR means, as detectron2's and Caffe's do,
            is given reversed), or None for a model that normalises itself. Default None.
        std: Per-channel standard deviation, likewise; given with ``mean`` or not at all.
            Default None.
        channel_order: "rgb" (default) or "bgr": the order the model's input channels are in.

    Raises:
        UsageError: a value count other than 3, ``mean`` without ``std`` or the reverse, a std
            of 0 or less, values on the 0-255 scale, or an unknown channel order.
    """

    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    channel_order: str = "rgb"

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise UsageError(f"--channel_order must be one of {list(CHANNEL_ORDERS)}, got {self.channel_order!r}")
        if (self.mean is None) != (self.std is None):
            given, missing = ("--mean", "--std") if self.std is None else ("--std", "--mean")
            raise UsageError(f"{given} was given without {missing}: pass both (e.g. {IMAGENET_FLAGS}) or neither")
        if self.mean is None:
            return
        for flag, values in (("--mean", self.mean), ("--std", self.std)):
            values = tuple(float(v) for v in values)
            object.__setattr__(self, flag[2:], values)
            if len(values) != 3 or not all(np.isfinite(values)):
                raise UsageError(f"{flag} takes 3 numbers R,G,B (e.g. {IMAGENET_FLAGS}), got {_flag_value(values)}")
            if max(values) > 1.0:
                scaled = ",".join(f"{v / 255:.4g}" for v in values)
                raise UsageError(f"{flag} {_flag_value(values)} looks like the 0-255 scale; pass it on the 0-1 "
                                 f"scale torchvision documents: {flag} {scaled}")
        if min(self.std) <= 0:
            raise UsageError(f"--std values must be > 0, got {_flag_value(self.std)}")

    @classmethod
    def from_flags(cls, mean: Optional[str] = None, std: Optional[str] = None,
                   channel_order: str = "rgb") -> "Preprocessing":
        """Parses the command-line strings ``"0.485,0.456,0.406"``.

        Raises:
            UsageError: a value that is not a number, or any check of the class.
        """
        return cls(_parse_triplet("--mean", mean), _parse_triplet("--std", std), channel_order)

    @property
    def normalises(self) -> bool:
        return self.mean is not None

    def flags(self) -> str:
        """The command-line flags that give this preprocessing ("" for the defaults)."""
        parts = []
        if self.mean is not None:
            parts.append(f"--mean {_flag_value(self.mean)} --std {_flag_value(self.std)}")
        if self.channel_order != "rgb":
            parts.append(f"--channel_order {self.channel_order}")
        return " ".join(parts)

    def to_json(self) -> Dict:
        return {"mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "channel_order": self.channel_order}


def _flag_value(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _parse_triplet(flag: str, text: Optional[str]) -> Optional[Tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(f"{flag} takes 3 comma-separated numbers R,G,B (e.g. {IMAGENET_FLAGS}), "
                         f"got {text!r}") from None


def _onnx():
    return import_optional("onnx", ONNX_HINT)


def load_model(path: str, what: str = "Model file"):
    """Reads an ONNX model (local or gs://) with the weights an exporter wrote beside it, as one ``ModelProto``.

    ``torch.onnx.export`` in torch 2.9 and later keeps weights in ``<model>.onnx.data`` beside the
    model unless told ``external_data=False``; those files are read from the model's folder
    (any Beam filesystem), so the result is whole and serialises to one file of bytes.

    Args:
        path: The ``.onnx`` file.
        what: The file's purpose for messages, best naming its flag. Default "Model file".

    Raises:
        EngineError: the file or a weights file it names cannot be read, or it is not ONNX.
    """
    return load_model_with_digest(path, what)[0]


def load_model_with_digest(path: str, what: str = "Model file"):
    """:func:`load_model`, and the sha256 (hex) of the bytes read: the model file, then each weights
    file it names in the order first named, so a change to the weights changes the digest too.

    Raises:
        EngineError: as :func:`load_model`.
    """
    import hashlib

    onnx = _onnx()
    from engines import storage

    data = storage.read_bytes(path, what)
    digest = hashlib.sha256(data)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise EngineError(f"{what} {path} is not an ONNX model ({len(data)} bytes): {e}") from e
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    files: Dict[str, bytes] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        parts = location.replace("\\", "/").split("/")
        if not location or location.startswith("/") or ".." in parts or ":" in parts[0]:
            raise EngineError(f"{what} {path} names its weights file {location!r}, which is not a file beside it; "
                              f"an exporter writes a plain file name (model.onnx.data): export the model again")
        if location not in files:
            files[location] = storage.read_bytes(storage.join(folder, location),
                                                 f"{what}'s weights file (written beside {path} by its exporter)")
            digest.update(files[location])
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(files[location]) - offset
        if offset < 0 or length < 0 or offset + length > len(files[location]):
            raise EngineError(f"{what} {path}: tensor {tensor.name!r} lies at bytes {offset}..{offset + length} of "
                              f"{location}, which holds {len(files[location])}: the weights file is truncated or "
                              f"belongs to another export; copy the pair again")
        tensor.raw_data = files[location][offset:offset + length]
        del tensor.external_data[:]
        tensor.ClearField("data_location")
    return model, digest.hexdigest()


def adapted_model_bytes(path: str, preprocessing: "Preprocessing", what: str = "Model file",
                        expect_sha256: Optional[str] = None) -> bytes:
    """The model at ``path`` with its weights and, where it needs one, the input conversion of :func:`wrap`,
    serialised: what an engine loads on a worker.

    Args:
        path: The model file.
        preprocessing: The flags.
        what: The file's purpose for messages. Default "Model file".
        expect_sha256: The digest (:func:`load_model_with_digest`) the launcher read, which every row
            names; another means the file changed since the job was launched. Default None: not checked.

    Raises:
        EngineError: as :func:`load_model` and :func:`wrap`, or a model that is not the one the job
            was launched with.
        UsageError: flags that do not fit the model (:func:`wrap`).
    """
    model, digest = load_model_with_digest(path, what)
    if expect_sha256 and digest != expect_sha256:
        raise EngineError(f"{what} {path} changed after the job was launched (sha256 {digest[:12]}..., the launcher "
                          f"read {expect_sha256[:12]}...): its rows would name another model. Replace model files "
                          f"only between runs (or give each version its own path), and rerun")
    return wrap(model, preprocessing, path).SerializeToString()


def _tensors(graph):
    """Every tensor a graph holds: initializers and constants, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _graph_inputs(model):
    initializers = {i.name for i in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _dim(d) -> Optional[int]:
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


def describe_input(model, source: str = "the model") -> InputSpec:
    """Reads the model's image input: layout, dtype, size and batch.

    The layout is told by where the 3 channels are: ``(N, 3, H, W)`` is NCHW, ``(N, H, W, 3)``
    is NHWC.

    Args:
        model: The ``onnx.ModelProto``.
        source: The model's file, for messages. Default "the model".

    Returns:
        The :class:`InputSpec`.

    Raises:
        EngineError: the model has other than one input, or the input is not a 4-d 3-channel
            image tensor of float32, float16 or uint8.
    """
    onnx = _onnx()
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise EngineError(f"{source} has {len(inputs)} inputs ({[v.name for v in inputs]}); the image pipeline "
                          f"feeds one image input. Export the model with one image input")
    value = inputs[0]
    tensor = value.type.tensor_type
    dtypes = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
              onnx.TensorProto.UINT8: np.uint8}
    type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
    if tensor.elem_type not in dtypes:
        raise EngineError(f"Input tensor: {value.name} of {source} | Received unexpected dtype: {type_name}. "
                          f"Note: Expected type: FLOAT, FLOAT16 or UINT8 (an image batch)")
    return image_input(value.name, dtypes[tensor.elem_type], [_dim(d) for d in tensor.shape.dim], source)


def image_input(name: str, dtype, dims: Sequence[Optional[int]], source: str = "the model") -> InputSpec:
    """The :class:`InputSpec` of an image input of known dtype and dimensions (None or -1: dynamic).

    What :func:`describe_input` does once it has the input, for an engine's input spec
    (``engines.base.TensorSpec``) as well as for an ONNX graph's.

    Raises:
        EngineError: ``dims`` is not a 4-d shape with one 3-channel axis.
    """
    dims = [None if d is None or d < 0 else int(d) for d in dims]
    shown = tuple("?" if d is None else d for d in dims)
    if len(dims) != 4:
        raise EngineError(f"Input tensor: {name} of {source} | shape {shown} is not an image batch. "
                          f"Note: Expected (N, 3, H, W) or (N, H, W, 3)")
    if dims[1] == 3 and dims[3] != 3:
        layout, (height, width) = "NCHW", dims[2:]
    elif dims[3] == 3 and dims[1] != 3:
        layout, (height, width) = "NHWC", dims[1:3]
    else:
        raise EngineError(f"Input tensor: {name} of {source} | shape {shown} has no 3-channel axis the "
                          f"layout can be told from. Note: Expected (N, 3, H, W) or (N, H, W, 3); the pipeline "
                          f"delivers RGB images (export grayscale or 4-channel models with a 3-channel input)")
    return InputSpec(name, layout, dtype, height, width, 3, dims[0])


def recorded_preprocessing(model) -> Optional[Preprocessing]:
    """The preprocessing :func:`wrap` prepended to this model (its ``input_adapter`` metadata), or None."""
    return recorded_preprocessing_of({p.key: p.value for p in model.metadata_props})


def wrap(model, preprocessing: Preprocessing = Preprocessing(), source: str = "the model"):
    """Returns the model with its input conversion prepended: its new input is uint8 ``(N, H, W, 3)`` RGB.

    The new input keeps the model's batch, height and width dimensions and is named "images"
    (or ``<input>_uint8`` where the model already uses "images"); outputs, their names and the
    metadata (``labels``) are kept, and ``input_adapter`` metadata records what was prepended.
    The conversion follows torchvision's ``ToTensor`` and ``Normalize`` op for op in float32
    (divide by 255, subtract the mean, divide by the std), so the wrapped model matches the
    original fed :func:`preprocess` exactly; TensorRT and ONNX Runtime fuse the few element-wise
    ops. For a float model the uint8 input feeds a Cast first and nothing else, as TensorRT asks
    of uint8 network inputs (its Python API docs, ``tensorrt.DataType.UINT8``). A float16 model
    gets the float32 result cast to float16, so the normalisation itself runs in float32.

    A model that takes uint8 NHWC already (the pipeline's contract: it normalises itself) is
    returned as it is, the same object, unless ``channel_order`` is "bgr". A model wrapped before
    with the same preprocessing is returned as it is too.

    Args:
        model: The ``onnx.ModelProto``; not modified.
        preprocessing: The flags. Default: no normalisation, RGB.
        source: The model's file, for messages. Default "the model".

    Returns:
        The wrapped ``onnx.ModelProto`` (a copy), or ``model`` itself when nothing is needed.

    Raises:
        UsageError: a float model without ``--mean``/``--std`` (the message prints the flags to
            add), ``--mean``/``--std`` for a model that takes uint8, or flags that differ from
            those a wrapped model was prepared with.
        EngineError: the model's input is not an image input (:func:`describe_input`).
    """
    onnx = _onnx()
    if not needs_wrap(model, preprocessing, source):
        return model
    spec = describe_input(model, source)

    helper = onnx.helper
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    graph = wrapped.graph
    taken = _names(graph)
    new_input = WRAPPED_INPUT_NAME if WRAPPED_INPUT_NAME not in taken else _unique(f"{spec.name}_uint8", taken)
    taken.add(new_input)
    nodes, tensor = [], new_input

    def add(op: str, inputs: Sequence[str], final: bool = False, **attrs) -> str:
        out = spec.name if final else _unique(f"{_PREFIX}{op}_output", taken)
        taken.add(out)
        nodes.append(helper.make_node(op, list(inputs), [out], name=_unique(f"{_PREFIX}{op}", taken), **attrs))
        taken.add(nodes[-1].name)
        return out

    def constant(name: str, array: np.ndarray) -> str:
        out = _unique(f"{_PREFIX}{name}", taken)
        taken.add(out)
        nodes.append(helper.make_node("Constant", [], [out], name=_unique(f"{out}_node", taken),
                                      value=onnx.numpy_helper.from_array(array, out)))
        return out

    # (op, constant second input or None, attributes), in the order the docstring shows; the last
    # step writes the model's own input name.
    steps = []
    if spec.dtype != np.uint8:
        steps.append(("Cast", None, {"to": onnx.TensorProto.FLOAT}))
    if preprocessing.normalises:
        steps += [("Div", ("255", np.array(255.0, np.float32)), {}),
                  ("Sub", ("mean", np.array(preprocessing.mean, np.float32)), {}),
                  ("Div", ("std", np.array(preprocessing.std, np.float32)), {})]
    if preprocessing.channel_order == "bgr":  # after normalising: mean and std are given per colour
        steps.append(("Gather", ("bgr_indices", np.array([2, 1, 0], np.int64)), {"axis": 3}))
    if spec.dtype == np.float16:
        steps.append(("Cast", None, {"to": onnx.TensorProto.FLOAT16}))
    if spec.layout == "NCHW":
        steps.append(("Transpose", None, {"perm": [0, 3, 1, 2]}))
    for i, (op, const, attrs) in enumerate(steps):
        inputs = [tensor] if const is None else [tensor, constant(*const)]
        tensor = add(op, inputs, final=i == len(steps) - 1, **attrs)

    old_input = next(v for v in graph.input if v.name == spec.name)
    batch, height, width, _ = (old_input.type.tensor_type.shape.dim[i] for i in
                               ((0, 2, 3, 1) if spec.layout == "NCHW" else (0, 1, 2, 3)))
    new_value = helper.make_tensor_value_info(new_input, onnx.TensorProto.UINT8, [
        _dim_of(batch), _dim_of(height), _dim_of(width), 3])
    kept = [v for v in graph.input if v.name != spec.name]
    del graph.input[:]
    graph.input.extend([new_value] + kept)
    graph.value_info.append(old_input)  # the old input's type and shape stay known inside the graph
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    entry = wrapped.metadata_props.add()
    entry.key = INPUT_ADAPTER_KEY
    entry.value = json.dumps({**preprocessing.to_json(), "input": new_input,
                              "model_input": spec.describe()})
    _LOG.info("%s: prepended uint8 NHWC RGB -> %s conversion (%s)", source, spec.describe(),
              preprocessing.flags() or "cast and layout only")
    return wrapped


def needs_wrap(model, preprocessing: Preprocessing = Preprocessing(), source: str = "the model") -> bool:
    """Whether :func:`wrap` would prepend a conversion to this model, with the checks it makes first.

    False for a model that takes the pipeline's uint8 NHWC RGB batches as they are, and for one
    wrapped before with the same preprocessing (or given none).

    Raises:
        UsageError: a float model without ``--mean``/``--std``, ``--mean``/``--std`` for a uint8
            model, or flags that differ from those a wrapped model was prepared with.
        EngineError: the model's input is not an image input (:func:`describe_input`).
    """
    spec = describe_input(model, source)
    recorded = recorded_preprocessing(model)
    if recorded is not None:
        if preprocessing in (recorded, Preprocessing()):
            return False
        raise UsageError(f"{source} was prepared with {recorded.flags() or 'no flags'} (its {INPUT_ADAPTER_KEY} "
                         f"metadata), and {preprocessing.flags()} was passed: pass the same flags, none, or "
                         f"prepare the original model again")
    check_flags(spec, preprocessing, source)
    return not (spec.is_pipeline_contract and preprocessing.channel_order == "rgb")


def check_flags(spec: InputSpec, preprocessing: Preprocessing, source: str = "the model") -> None:
    """Checks that the flags fit the model's input: a mean and std for float input, none for uint8.

    Raises:
        UsageError: a float input without ``--mean``/``--std`` (the message prints the flags to
            add), or ``--mean``/``--std`` for a uint8 input.
    """
    if spec.dtype == np.uint8 and preprocessing.normalises:
        raise UsageError(f"{source} takes uint8 images ({spec.describe()}) and normalises them itself; drop "
                         f"--mean and --std (they are for models that take float input)")
    if spec.dtype != np.uint8 and not preprocessing.normalises:
        raise UsageError(f"{source} takes {spec.dtype} input ({spec.describe()}), normalised outside the model: "
                         f"pass the mean and std it was trained with, on the 0-1 scale, e.g. {IMAGENET_FLAGS} "
                         f"for ImageNet-trained torchvision/timm models (their model card or "
                         f"timm.data.resolve_data_config() tells; add --channel_order bgr for models trained "
                         f"on BGR images)")


def _dim_of(d):
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return d.dim_param or None


def _names(graph) -> set:
    names = {v.name for v in graph.input} | {v.name for v in graph.output} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _unique(name: str, taken: set) -> str:
    if name not in taken:
        return name
    i = 1
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def preprocess(images: np.ndarray, spec: InputSpec, preprocessing: Preprocessing,
               source: str = "the model") -> np.ndarray:
    """The reference conversion in numpy: uint8 RGB ``(N, H, W, 3)`` -> the model's own input.

    What a torchvision user's code does (``ToTensor``, ``Normalize``, stacking, a channel swap
    for BGR models), op for op in float32, the same steps :func:`wrap` prepends to the graph.
    Validation feeds its result to the original model to check the wrapped one.

    Args:
        images: uint8 RGB batch ``(N, H, W, 3)``.
        spec: The model's input (:func:`describe_input`).
        preprocessing: The flags.
        source: The model's file, for messages. Default "the model".

    Returns:
        A C-contiguous array in the model's layout and dtype.

    Raises:
        EngineError: ``images`` is not a uint8 ``(N, H, W, 3)`` batch.
        UsageError: the flags do not fit the model's input (:func:`check_flags`).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise EngineError(f"preprocess takes a uint8 (N, H, W, 3) RGB batch, got {images.dtype} {images.shape}")
    check_flags(spec, preprocessing, source)
    x = images
    if spec.dtype != np.uint8:
        x = x.astype(np.float32)
    if preprocessing.normalises:
        x = x / np.float32(255.0)
        x = x - np.asarray(preprocessing.mean, np.float32)
        x = x / np.asarray(preprocessing.std, np.float32)
    if preprocessing.channel_order == "bgr":
        x = x[..., ::-1]
    x = x.astype(spec.dtype, copy=False)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x)


def _producers(graph) -> Dict[str, object]:
    return {out: node for node in graph.node for out in node.output}


def final_activation(model, output_name: str, source: str = "the model") -> Optional[str]:
    """The activation the graph ends in on ``output_name``: "softmax", "sigmoid" or None.

    Looks back from the output through ops that keep values as they are (Identity, Reshape,
    Flatten, Squeeze, Unsqueeze, Cast) to the op that made them. LogSoftmax counts as no
    activation: a softmax over log-probabilities gives the probabilities back exactly.

    Raises:
        EngineError: ``output_name`` is not an output of the model.
    """
    outputs = [v.name for v in model.graph.output]
    if output_name not in outputs:
        raise EngineError(f"Output tensor: {output_name} | not an output of {source} (outputs: {outputs})")
    producers = _producers(model.graph)
    node = producers.get(output_name)
    while node is not None and node.op_type in _PASS_THROUGH_OPS and node.domain in ("", "ai.onnx"):
        node = producers.get(node.input[0])
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    return _FINAL_ACTIVATIONS.get(node.op_type)


def recorded_activations(model) -> Dict[str, str]:
    """The activations ``prepare_model`` chose, by output name (``output_activation`` metadata)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return dict(json.loads(meta[OUTPUT_ACTIVATION_KEY])) if OUTPUT_ACTIVATION_KEY in meta else {}


def resolve_activation(model, output_name: str, requested: str = "auto", source: str = "the model") -> str:
    """What post-processing applies to ``output_name`` to get scores: "softmax", "sigmoid" or "none".

    ``auto`` takes what ``prepare_model`` recorded in the model's metadata; else "none" when the
    graph already ends in Softmax or Sigmoid (:func:`final_activation`); else "softmax" (logits
    of a single-label classifier). Pass "sigmoid" for multi-label heads that end in logits and
    "none" for embeddings or scores to keep raw. The choice made for ``auto`` is logged.

    Args:
        model: The ``onnx.ModelProto``.
        output_name: The output the pipeline ranks.
        requested: One of :data:`ACTIVATIONS`. Default "auto".
        source: The model's file, for messages. Default "the model".

    Raises:
        UsageError: an unknown value, or "softmax"/"sigmoid" for an output that already ends in
            Softmax or Sigmoid (it would apply twice: 0.831 becomes 0.0023 over 1000 classes).
        EngineError: ``output_name`` is not an output of the model.
    """
    if requested not in ACTIVATIONS:
        raise UsageError(f"--activation must be one of {list(ACTIVATIONS)}, got {requested!r}")
    ends_in = final_activation(model, output_name, source)
    if requested in ("softmax", "sigmoid") and ends_in is not None:
        raise UsageError(f"--activation {requested}: output {output_name!r} of {source} already ends in "
                         f"{ends_in.capitalize()}, and applying {requested} on top would squash its scores; "
                         f"pass --activation auto or none")
    if requested != "auto":
        return requested
    recorded = recorded_activations(model).get(output_name)
    if recorded is not None:
        if recorded not in ACTIVATIONS or recorded == "auto":
            raise EngineError(f"{source}: {OUTPUT_ACTIVATION_KEY} metadata holds {recorded!r} for output "
                              f"{output_name!r}; expected one of softmax, sigmoid, none. Prepare the model again")
        _LOG.info("activation %s for output %r: recorded in %s's metadata", recorded, output_name, source)
        return recorded
    if ends_in is not None:
        _LOG.info("activation none for output %r: %s already ends in %s", output_name, source,
                  ends_in.capitalize())
        return "none"
    _LOG.info("activation softmax for output %r of %s: its graph ends in no Softmax or Sigmoid (pass "
              "--activation sigmoid for a multi-label model, none for raw scores)", output_name, source)
    return "softmax"


def record_activation(model, output_name: str, activation: str) -> None:
    """Writes ``activation`` for ``output_name`` into the model's ``output_activation`` metadata (in place).

    Raises:
        UsageError: ``activation`` is "auto" or unknown (resolve it first).
    """
    if activation not in ACTIVATIONS or activation == "auto":
        raise UsageError(f"record_activation takes softmax, sigmoid or none, got {activation!r}")
    recorded = recorded_activations(model)
    recorded[output_name] = activation
    for entry in model.metadata_props:
        if entry.key == OUTPUT_ACTIVATION_KEY:
            entry.value = json.dumps(recorded)
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = OUTPUT_ACTIVATION_KEY, json.dumps(recorded)


def activation_reason(model, output_name: str) -> str:
    """Why ``auto`` chose what it chose for ``output_name`` (for the log and stats.json)."""
    if output_name in recorded_activations(model):
        return f"recorded in the model's {OUTPUT_ACTIVATION_KEY} metadata"
    ends_in = final_activation(model, output_name)
    if ends_in:
        return f"the graph ends in {ends_in.capitalize()}"
    return "the graph ends in no Softmax or Sigmoid: softmax"


def output_activations(model) -> Tuple[Dict[str, str], Dict[str, str]]:
    """For each output: what ``--activation auto`` resolves to, and the activation its graph ends in
    (only outputs that end in one): what a TensorRT plan's sidecar records for the job."""
    auto, ends = {}, {}
    for value in model.graph.output:
        auto[value.name] = resolve_activation(model, value.name)
        ending = final_activation(model, value.name)
        if ending:
            ends[value.name] = ending
    return auto, ends


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """What an engine artefact built from an ONNX model (a TensorRT plan's sidecar) says of that model.

    Attributes:
        path: The artefact's file.
        inputs: ``(name, ONNX element type name, dims)`` of its inputs.
        outputs: Likewise for outputs.
        preprocessing: The conversion prepended to the model it was built from
            (``input_adapter`` metadata), or None.
        activations: Output name -> what ``--activation auto`` resolves to.
        final_activations: Output name -> the activation the graph ends in (outputs that end in one).
        sha256: The artefact's sha256 (hex), or None.
    """

    path: str
    inputs: tuple = ()
    outputs: tuple = ()
    preprocessing: Optional[Preprocessing] = None
    activations: Dict[str, str] = dataclasses.field(default_factory=dict)
    final_activations: Dict[str, str] = dataclasses.field(default_factory=dict)
    sha256: Optional[str] = None


def recorded_preprocessing_of(metadata: Dict[str, str]) -> Optional[Preprocessing]:
    """:func:`recorded_preprocessing` from a metadata dict (as a plan's sidecar keeps it)."""
    if INPUT_ADAPTER_KEY not in metadata:
        return None
    data = json.loads(metadata[INPUT_ADAPTER_KEY])
    return Preprocessing(tuple(data["mean"]) if data.get("mean") else None,
                         tuple(data["std"]) if data.get("std") else None, data.get("channel_order", "rgb"))


_FP16_HINT = ("--precision fp16 converts the ONNX model with onnxconverter-common: pip install onnxconverter-common "
              "(it is in the image built from Dockerfile).")


def convert_to_fp16(model_bytes: bytes) -> bytes:
    """Converts float32 weights and compute to float16, keeping the model's input/output types.

    Used for ``--precision fp16`` by ONNX Runtime, and by TensorRT 11.x, whose strongly typed
    networks take their precision from the ONNX model (docs/tensorrt.md, "TensorRT facts"). The
    pipeline's uint8 input stays uint8 (its Cast goes straight to float16) and the outputs stay
    float32 (onnxconverter-common's ``keep_io_types``).

    Raises:
        ImportError: onnxconverter-common is missing, naming the package.
    """
    onnx = import_optional("onnx", ONNX_HINT)
    model = onnx.load_model_from_string(model_bytes)
    weights = {t.data_type for t in model.graph.initializer}  # not the adapter's float32 mean and std
    if onnx.TensorProto.FLOAT16 in weights and onnx.TensorProto.FLOAT not in weights:
        _LOG.info("the model's weights are float16 already: no conversion")
        return model_bytes  # onnxconverter-common refuses a model it converted before
    float16 = import_optional("onnxconverter_common.float16", _FP16_HINT)
    float_casts = {node.output[0] for node in model.graph.node
                   if node.op_type == "Cast" and _cast_to(node) == onnx.TensorProto.FLOAT}
    with warnings.catch_warnings(record=True) as caught:  # one warning per clamped weight: summarise
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    if caught:
        _LOG.info("fp16 conversion: %d float32 values were clamped to the float16 range (%s)", len(caught),
                  caught[0].message)
    # The converter retypes the outputs of the model's own Cast(to=float) nodes (e.g. the
    # uint8 -> float cast at the input) to float16 but leaves their `to` attribute, which
    # makes the graph inconsistent (ONNX Runtime refuses it; a strongly typed TensorRT
    # network would mix types). Casts it inserted itself, and casts to graph outputs, stay.
    outputs = {o.name for o in converted.graph.output}
    for node in converted.graph.node:
        if node.op_type == "Cast" and node.output[0] in float_casts and node.output[0] not in outputs:
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = onnx.TensorProto.FLOAT16
    return converted.SerializeToString()


def _cast_to(node) -> int:
    for attr in node.attribute:
        if attr.name == "to":
            return attr.i
    return -1
