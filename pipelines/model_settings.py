"""What the job knows about its model before anything runs, resolved once by :func:`resolve_model`.

Any image model exported the usual way runs (docs/own-model.md): its input (layout, dtype, size)
is read from the model, and the conversion from the pipeline's uint8 RGB crops that
``--mean``/``--std``/``--channel_order`` describe is prepended to its graph where the engine loads
it (``engines.model_adapter.wrap``); the crop and the resize default from the model's input size.
How the outputs become rows: ``--output_mode topk`` ranks one output after the activation
``--activation`` names (``auto`` reads the end of the graph, so a model ending in Softmax is not
softmaxed twice) and, with ``--threshold``, keeps every class at or above it; ``--output_mode raw``
writes whole outputs (embeddings, anything top-k does not fit). Every row names the model that made
it (:attr:`ModelSettings.identity`).

The flags are added to the job's parser by :func:`add_flags`, in two groups.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

from engines.activations import ACTIVATIONS
from engines.base import EngineError, UsageError
from engines.flags import FlagRange, ModelFile, check_range
from engines.model_adapter import CHANNEL_ORDERS, IMAGENET_FLAGS, InputSpec, Preprocessing
from transforms.images import RESERVED_COLUMNS

_LOG = logging.getLogger(__name__)

OUTPUT_MODES = ("topk", "raw")
#: The output ``--output_mode topk`` ranks when ``--output_name`` is not given and the model has it.
DEFAULT_OUTPUT_NAME = "logits"
#: Crop and resize when neither the flags nor the model say: the ImageNet convention.
DEFAULT_CROP = 224
DEFAULT_RESIZE = 256
#: ``--resize`` defaults to the crop's longer side times this (256 for a 224 crop, as torchvision's
#: ImageNet evaluation resizes), so the centre crop keeps the same share of every image.
RESIZE_RATIO = DEFAULT_RESIZE / DEFAULT_CROP
#: Largest --resize or --crop side: a resized image with a 16384-pixel shorter side holds over 768 MiB of
#: pixels, and no classifier takes inputs near that size.
MAX_SIDE = 16_384
_SIDE_WHY = "no classifier takes inputs near this size"
#: Output element types raw mode writes (as float lists), by ONNX type name -> numpy dtype name.
RAW_TYPES = {"FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64"}

FLAG_RANGES = (
    FlagRange("--resize", "resize", 1, MAX_SIDE, _SIDE_WHY),
    FlagRange("--threshold", "threshold", 0, 1, "scores after softmax or sigmoid are probabilities"),
)


def parse_crop(text: str) -> Tuple[int, int]:
    """``--crop``: ``224`` (a square) or ``240x320`` (height x width) -> (height, width).

    Raises:
        UsageError: not one or two whole numbers, or a side out of 1..MAX_SIDE.
    """
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        raise UsageError(f"--crop takes a size such as 224 (square) or 240x320 (height x width), "
                         f"got {text!r}") from None
    if len(sides) not in (1, 2):
        raise UsageError(f"--crop takes a size such as 224 (square) or 240x320 (height x width), got {text!r}")
    for side in sides:
        check_range("--crop", side, 1, MAX_SIDE, _SIDE_WHY)
    return (sides[0], sides[-1])


def add_flags(parser) -> None:
    """Adds the model's input and output flags (the resize and crop stay with the job's own flags)."""
    given = parser.add_argument_group("preprocessing: how the pipeline's uint8 RGB crops become the model's input")
    given.add_argument("--mean", default=None, metavar="R,G,B",
                       help="Models that take float input: the mean the model was trained with, per colour on the 0-1 "
                            f"scale, as torchvision and timm print it (ImageNet: {IMAGENET_FLAGS}). The conversion "
                            "is prepended to the model's graph when the engine loads it (docs/own-model.md).")
    given.add_argument("--std", default=None, metavar="R,G,B", help="With --mean: the standard deviation, likewise.")
    given.add_argument("--channel_order", default="rgb", choices=CHANNEL_ORDERS,
                       help="The order of the model's input channels: bgr for models trained on BGR images. "
                            "Default: rgb.")
    out = parser.add_argument_group("model output: how the model's outputs become rows")
    out.add_argument("--output_mode", default="topk", choices=OUTPUT_MODES,
                     help="topk: the best --top_k classes of one output, with scores (or every class at or above "
                          "--threshold); raw: each --output_name output as a list of floats (embeddings, any "
                          "model). Default: topk.")
    out.add_argument("--output_name", dest="output_names", action="append", default=None, metavar="NAME",
                     help="The model output to use; repeatable with --output_mode raw. Default: topk ranks "
                          f"'{DEFAULT_OUTPUT_NAME}', or the model's first output when it has none of that name; raw "
                          "writes every output.")
    out.add_argument("--activation", default="auto", choices=ACTIVATIONS,
                     help="How the ranked output becomes scores: softmax (single-label logits), sigmoid (multi-label "
                          "logits), none (scores already), auto (the choice prepare_model recorded in the model, else "
                          "none when the graph ends in Softmax or Sigmoid, else softmax). Default: auto.")
    out.add_argument("--threshold", type=float, default=None, metavar="T",
                     help="--output_mode topk: write every class scoring at or above T (0..1; multi-label models "
                          "with --activation sigmoid) instead of the best --top_k. Default: off.")
    out.add_argument("--model_version", default=None,
                     help="What rows say made them (the 'model' field). Default: the model file's name and the "
                          "first 12 hex digits of its sha256.")


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """One model output as rows carry it.

    Attributes:
        name: The output's name.
        dtype: Its element type as numpy names it ("float32", "float16", ...), or "" when unknown.
        size: Values per image (the product of its non-batch dimensions), None when dynamic or unknown.
    """

    name: str
    dtype: str = ""
    size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The model's side of the run's settings: its input, how its outputs become rows, and its identity.

    Attributes:
        preprocessing: ``--mean``, ``--std``, ``--channel_order``.
        input: The model's own image input as read from it (before any conversion), or None when
            the engine's artefact does not say (a plan without a sidecar, a model not read).
        wrapped: The engine prepends the conversion when it loads the model.
        output_mode: "topk" or "raw".
        outputs: The outputs rows carry: the ranked one (topk), or every written one (raw).
        activation: What post-processing applies to the ranked output: "softmax", "sigmoid" or
            "none" (always "none" in raw mode).
        activation_why: How the activation was chosen, for the log and stats.json.
        threshold: ``--threshold``, or None: the best ``--top_k``.
        file: The file the engine loads (the ONNX model or the plan).
        sha256: Its content's sha256 (hex; an ONNX model's weights files included), or None when
            it was not read.
        version: ``--model_version``, or None.
        prepared: The model carries the conversion already (``prepare_model``'s ``input_adapter``
            metadata; ``preprocessing`` is then the one it records).
    """

    preprocessing: Preprocessing
    input: Optional[InputSpec]
    wrapped: bool
    output_mode: str
    outputs: Tuple[OutputSpec, ...]
    activation: str
    activation_why: str
    threshold: Optional[float]
    file: str
    sha256: Optional[str]
    version: Optional[str] = None
    prepared: bool = False

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def identity(self) -> str:
        """What every row's ``model`` field says: ``--model_version``, else ``name.onnx@sha256:<12 hex>``."""
        if self.version:
            return self.version
        name = os.path.basename(self.file.rstrip("/")) or self.file
        return f"{name}@sha256:{self.sha256[:12]}" if self.sha256 else name

    def input_size(self) -> Optional[Tuple[Optional[int], Optional[int]]]:
        """The model's input (height, width), None for a dynamic side; None when the input is not known."""
        return None if self.input is None else (self.input.height, self.input.width)

    def record(self) -> Dict[str, Any]:
        """The model section of stats.json and ``_SUCCESS`` (a new dict each call)."""
        return {
            "identity": self.identity, "file": self.file, "sha256": self.sha256, "version": self.version,
            "input": self.input.describe() if self.input else None,
            "preprocessing": {**self.preprocessing.to_json(), "in_graph": self.wrapped or self.prepared,
                              "added_at_load": self.wrapped},
            "output_mode": self.output_mode,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
            "activation": self.activation, "activation_choice": self.activation_why,
            "threshold": self.threshold,
        }


def preprocessing(options) -> Preprocessing:
    """``--mean``, ``--std``, ``--channel_order``, checked.

    Raises:
        UsageError: naming the flag and the fix (``engines.model_adapter.Preprocessing``).
    """
    return Preprocessing.from_flags(options.mean, options.std, options.channel_order)


def crop_and_resize(options, input_size: Optional[Tuple[Optional[int], Optional[int]]]) -> Tuple[
        Tuple[int, int], int, str]:
    """The crop (height, width) and the resize (shorter side): the flags, else the model's input size.

    Args:
        options: The parsed options (``--crop``, ``--resize``).
        input_size: The model's input (height, width), None for a side it leaves dynamic; or None
            when the model's input is not known.

    Returns:
        (crop, resize, one line saying where they came from).

    Raises:
        UsageError: a ``--crop`` whose height or width the model's input does not take, naming the
            side and the flag to pass.
    """
    height, width = input_size or (None, None)
    crop = parse_crop(options.crop) if options.crop is not None else None
    if crop is not None:
        wrong = [f"{side} {got} is not {want}" for side, got, want in (("height", crop[0], height),
                                                                      ("width", crop[1], width))
                 if want is not None and got != want]
        if wrong:
            fits = f"{height or crop[0]}" if (height or crop[0]) == (width or crop[1]) else \
                f"{height or crop[0]}x{width or crop[1]}"
            raise UsageError(f"--crop {options.crop} does not fit the model: it takes "
                             f"{height or 'any'} x {width or 'any'} images (height x width; {', '.join(wrong)}); "
                             f"pass --crop {fits}, or leave --crop out to follow the model")
        where = "--crop"
    elif height or width:
        crop, where = (height or width, width or height), "the model's input"
    else:
        crop, where = (DEFAULT_CROP, DEFAULT_CROP), "the default"
        if input_size is not None:
            _LOG.warning("the model's input size is dynamic: cropping %dx%d; pass --crop HxW for the size it was "
                         "trained at", *crop)
    resize = options.resize if options.resize is not None else math.ceil(max(crop) * RESIZE_RATIO)
    why = f"crop {crop[0]}x{crop[1]} from {where}, resize {resize} " + \
          ("from --resize" if options.resize is not None else f"({RESIZE_RATIO:.4g} x the crop's longer side)")
    return crop, resize, why


def check_output_flags(options) -> None:
    """Flag combinations that cannot work, whatever the model.

    Raises:
        UsageError: naming the flags.
    """
    if options.output_mode == "raw":
        if options.threshold is not None:
            raise UsageError("--threshold picks classes with --output_mode topk; --output_mode raw writes whole "
                             "outputs: drop one of them")
        if options.activation not in ("auto", "none"):
            raise UsageError(f"--output_mode raw writes the outputs as the model gives them; --activation "
                             f"{options.activation} applies to --output_mode topk: drop it")
    elif options.output_names and len(options.output_names) > 1:
        raise UsageError(f"--output_mode topk ranks one output; --output_name was given {len(options.output_names)} "
                         f"times ({', '.join(options.output_names)}): pass one, or --output_mode raw to write each")


def _output_specs(outputs: Sequence[Tuple[str, str, Sequence[int]]]) -> Dict[str, OutputSpec]:
    specs = {}
    for name, onnx_type, dims in outputs:
        dims = list(dims)
        rest = [int(d) for d in dims[1:]]
        if not dims:  # no shape declared: its size is known only when it runs
            size = None
        else:  # (N,): one value per image
            size = math.prod(rest) if all(d > 0 for d in rest) else None
        specs[name] = OutputSpec(name, RAW_TYPES.get(onnx_type, onnx_type.lower()), size)
    return specs


def _reserved_fields(options) -> Tuple[str, ...]:
    """Field names a raw output may not take: the rows' own, and the BigQuery run columns with ``--output_table``."""
    from transforms.bigquery import RUN_COLUMNS

    return RESERVED_COLUMNS + (tuple(c["name"] for c in RUN_COLUMNS) if getattr(options, "output_table", None) else ())


def _choose_outputs(options, specs: Dict[str, OutputSpec], source: str) -> Tuple[OutputSpec, ...]:
    names = list(options.output_names or ())
    known = list(specs)
    if known:
        missing = [n for n in names if n not in specs]
        if missing:
            raise UsageError(f"--output_name {missing[0]!r} is not an output of {source}; its outputs are {known}")
    if options.output_mode == "raw":
        chosen = names or known
        if not chosen:
            raise UsageError(f"--output_mode raw: the outputs of {source} are not known here; name them with "
                             f"--output_name")
        reserved = _reserved_fields(options)
        for name in chosen:
            if name.lower() in {r.lower() for r in reserved}:  # BigQuery's column names ignore case
                raise UsageError(f"--output_mode raw writes output {name!r} in a field of that name, which rows use "
                                 f"for something else ({', '.join(reserved)}; case does not matter): rename the output "
                                 f"when exporting")
            spec = specs.get(name)
            if spec is not None and spec.dtype and spec.dtype not in RAW_TYPES.values():
                raise UsageError(f"--output_mode raw writes float outputs; {name!r} of {source} is {spec.dtype}: "
                                 f"name float outputs with --output_name")
        return tuple(specs.get(n, OutputSpec(n)) for n in chosen)
    if names:
        name = names[0]
    elif DEFAULT_OUTPUT_NAME in specs or not known:
        name = DEFAULT_OUTPUT_NAME
    else:
        name = known[0]
        _LOG.info("ranking output %r of %s (it has no %r output; pass --output_name to choose)", name, source,
                  DEFAULT_OUTPUT_NAME)
    spec = specs.get(name, OutputSpec(name))
    if spec.dtype and spec.dtype not in RAW_TYPES.values():
        raise UsageError(f"--output_mode topk ranks scores; output {name!r} of {source} is {spec.dtype}: name a float "
                         f"output with --output_name (outputs: {known})")
    return (spec,)


def _check_scores(options, output: OutputSpec, activation: str, ends_in: Optional[str], source: str) -> None:
    """Refuses ranking that cannot give meaningful scores.

    Raises:
        UsageError: softmax over one value per image (always 1.0), or ``--threshold`` on values that are
            not probabilities (``--activation none`` on an output that ends in no Softmax or Sigmoid).
    """
    if activation == "softmax" and output.size == 1:
        raise UsageError(f"output {output.name!r} of {source} holds one value per image, and softmax over one value "
                         f"is always 1.0: pass --activation sigmoid (a binary score from a logit) or none (a score "
                         f"already), or --output_mode raw")
    if options.threshold is not None and activation == "none" and ends_in is None:
        raise UsageError(f"--threshold {options.threshold:g} compares probabilities, and output {output.name!r} of "
                         f"{source} ends in no Softmax or Sigmoid while --activation none adds none: pass --activation "
                         f"sigmoid (multi-label logits) or softmax")
    if options.threshold is not None and activation == "softmax":
        _LOG.warning("--threshold %g with softmax: the scores of one image sum to 1, so few classes reach it; a "
                     "multi-label model takes --activation sigmoid", options.threshold)


class LoadedModel(NamedTuple):
    """An ONNX model read once at start, with what the launcher needs of it.

    Attributes:
        proto: The ``onnx.ModelProto``, its weights files read in.
        sha256: Its digest (``engines.model_adapter.load_model_with_digest``).
        summary: Its inputs, outputs and metadata (``engines.onnx_summary.OnnxSummary``).
    """

    proto: Any
    sha256: str
    summary: Any


def read_model(model: Optional[ModelFile], read: bool = True) -> Optional[LoadedModel]:
    """Reads the model the engine's flags name, once: its file and weights files, digest and summary.

    Args:
        model: The ONNX model (``pipelines.engine_registry.model_file``), or None.
        read: A model that cannot be read is an error (start checks). False: None instead.

    Raises:
        EngineError: the model cannot be read or is not ONNX (with ``read``).
    """
    from engines import model_adapter
    from engines.onnx_summary import summarize_model

    if model is None:
        return None
    try:
        proto, digest = model_adapter.load_model_with_digest(model.path, f"{model.flag} file")
    except EngineError:
        if read:
            raise
        return None
    return LoadedModel(proto, digest, summarize_model(proto))


def resolve_model(options, model: Optional[ModelFile], built: Optional[Any] = None, *,
                  read: bool = True, loaded: Optional[LoadedModel] = None) -> ModelSettings:
    """Reads the model the engine will load and resolves everything the job needs to know about it.

    Args:
        options: The parsed options (read by attribute, never changed).
        model: The ONNX model the engine's flags name (``pipelines.engine_registry.model_file``), or None.
        built: Without an ONNX model: what the engine's built artefact says of the model it came from
            (``engines.base.BuiltModel``, a TensorRT plan's sidecar), or None.
        read: Read the model file (start checks). False: only when it can be read, and a model
            that cannot be read is described from the flags alone (tools and tests that build a
            job from its flags).
        loaded: ``model`` as :func:`read_model` read it already, or None to read it here.

    Raises:
        UsageError: flags that do not fit the model (a float model without ``--mean``/``--std``,
            an output it lacks, an activation applied twice), naming the flag and the fix.
        EngineError: a model the pipeline cannot feed, or that cannot be read.
    """
    from engines import model_adapter

    check_output_flags(options)
    given = preprocessing(options)
    version = options.model_version or None
    if model is not None:
        loaded = loaded or read_model(model, read)
        if loaded is not None:
            proto, digest = loaded.proto, loaded.sha256
            spec = model_adapter.describe_input(proto, model.path)
            wrapped = model_adapter.needs_wrap(proto, given, model.path)
            outputs = _choose_outputs(options, _output_specs(loaded.summary.outputs), model.path)
            if options.output_mode == "raw":
                activation, why = "none", "raw outputs"
            else:
                name = outputs[0].name
                activation = model_adapter.resolve_activation(proto, name, options.activation, model.path)
                why = "asked for" if options.activation != "auto" else "auto: " + \
                    model_adapter.activation_reason(proto, name)
                # A choice prepare_model recorded is the model owner's word on what the output holds.
                ends_in = model_adapter.final_activation(proto, name) or \
                    model_adapter.recorded_activations(proto).get(name)
                _check_scores(options, outputs[0], activation, ends_in, model.path)
            recorded = model_adapter.recorded_preprocessing(proto)
            return ModelSettings(recorded if recorded is not None and given == Preprocessing() else given, spec,
                                 wrapped, options.output_mode, outputs, activation, why, options.threshold, model.path,
                                 digest, version, prepared=recorded is not None)
        return _from_flags(options, given, model.path, version)
    if built is not None:
        return _from_built(options, given, built, version)
    return _from_flags(options, given, "", version)


def _from_flags(options, given: Preprocessing, path: str, version: Optional[str]) -> ModelSettings:
    outputs = _choose_outputs(options, {}, path or "the model")
    activation = "none" if options.output_mode == "raw" else \
        ("softmax" if options.activation == "auto" else options.activation)
    return ModelSettings(given, None, given != Preprocessing(), options.output_mode, outputs, activation,
                         "asked for" if options.activation != "auto" else "auto: the model was not read",
                         options.threshold, path, None, version)


def _from_built(options, given: Preprocessing, built, version: Optional[str]) -> ModelSettings:
    """From a built artefact's record: the plan takes what the model it was built from took."""
    from engines import model_adapter

    source = built.path
    spec = None
    if built.inputs:
        if len(built.inputs) != 1:
            raise EngineError(f"{source} has {len(built.inputs)} inputs; the image pipeline feeds one image input")
        (name, onnx_type, dims), = built.inputs
        dtypes = {"UINT8": "uint8", "FLOAT": "float32", "FLOAT16": "float16"}
        if onnx_type not in dtypes:
            raise EngineError(f"Input tensor: {name} of {source} | {onnx_type}; expected UINT8, FLOAT or FLOAT16")
        spec = model_adapter.image_input(name, dtypes[onnx_type], dims, source)
        if not spec.is_pipeline_contract:
            raise UsageError(f"{source} takes {spec.describe()}: a plan runs as it was built, so build it from a "
                             f"prepared model (python -m model_tools.prepare_model IN.onnx OUT.onnx "
                             f"{given.flags() or IMAGENET_FLAGS}, then model_tools.build), or pass the ONNX model as "
                             f"--onnx_path with these flags")
    if given != Preprocessing():
        recorded = built.preprocessing
        if recorded is None or recorded != given:
            raise UsageError(f"{given.flags()} cannot be applied to {source}: a plan runs as it was built "
                             f"({recorded.flags() if recorded else 'with no conversion recorded'}); prepare the "
                             f"ONNX model with these flags and build the plan from it, or drop them")
    outputs = _choose_outputs(options, _output_specs(built.outputs), source)
    if options.output_mode == "raw":
        activation, why = "none", "raw outputs"
    elif options.activation != "auto":
        ends_in = built.final_activations.get(outputs[0].name)
        if options.activation in ("softmax", "sigmoid") and ends_in:
            raise UsageError(f"--activation {options.activation}: output {outputs[0].name!r} of {source} already ends "
                             f"in {ends_in.capitalize()}; pass --activation auto or none")
        activation, why = options.activation, "asked for"
    elif outputs[0].name in built.activations:
        activation, why = built.activations[outputs[0].name], "auto: recorded in the plan's sidecar"
    else:
        activation, why = "softmax", "auto: the plan's sidecar records none (built before it did): softmax"
        _LOG.warning("%s: its sidecar does not say how output %r becomes scores; applying softmax (pass "
                     "--activation to choose, or rebuild the plan to record it)", source, outputs[0].name)
    if options.output_mode != "raw":
        name = outputs[0].name
        _check_scores(options, outputs[0], activation, built.final_activations.get(name) or built.activations.get(name),
                      source)
    return ModelSettings(built.preprocessing or given, spec, False, options.output_mode, outputs, activation, why,
                         options.threshold, source, built.sha256, version, prepared=built.preprocessing is not None)
