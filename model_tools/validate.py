"""Check an engine against the ONNX Runtime fp32 reference on real images.

    python -m model_tools.validate --engine_path model.plan --reference model.onnx [--images a.jpg ...]
    python -m model_tools.validate --onnx_path model.onnx [--engine_cache DIR] [--fp16 ...] --reference model.onnx
    python -m model_tools.validate --engine onnxruntime --onnx_path model_fp16.onnx --reference model.onnx
    python -m model_tools.validate --engine_path prepared.plan --reference own_model.onnx --mean R,G,B --std R,G,B

Runs the candidate engine and ONNX Runtime (CPU, fp32) on the same images (default:
the photos shipped with scikit-image), preprocessed to the model's input size as
uint8 (shorter side resized, centre crop). With ``--mean``/``--std`` (and ``--channel_order``)
the reference is a user's own float model (docs/own-model.md): it is fed those pixels
converted in numpy as its users' code does (``engines.model_adapter.preprocess``), while the
candidate takes the uint8 batch: a model written by ``model_tools.prepare_model``, a plan built
from it, or, with ``--engine onnxruntime``, the original wrapped in memory as a job wraps it.
It reports the largest absolute
difference of the logits and of the softmax probabilities, and top-1 agreement.
Exits 1 when a tolerance is exceeded (defaults per precision) or when the top-1
class differs on an image where the reference is confident (its top-2 probability
margin exceeds twice the probability tolerance), 2 on setup errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from engines.base import Engine, EngineError, TensorSpec, UsageError
from engines.model_adapter import Preprocessing, image_input, preprocess

_LOG = logging.getLogger(__name__)

#: Photos shipped inside scikit-image (no download needed).
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "colorwheel", "camera", "coins", "stereo_motorcycle")


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """Largest accepted absolute differences against the fp32 reference.

    Attributes:
        logits: On the raw outputs.
        probs: On softmax probabilities.
        min_top1: Least share of images whose top-1 class matches the reference. Near-ties
            may flip under TF32/fp16 (those pass unless the reference was confident), so
            the default leaves room for one flip in ten. Default 0.9.
    """

    logits: float
    probs: float
    min_top1: float = 0.9


#: fp32 TensorRT builds may use TF32 on Ampere and newer (on by default), hence not 1e-5.
DEFAULT_TOLERANCES = {"fp32": Tolerances(logits=0.05, probs=2e-3), "fp16": Tolerances(logits=0.5, probs=0.01)}


@dataclasses.dataclass
class ValidationReport:
    """The comparison of a candidate engine with the reference."""

    images: int
    output: str
    precision: str
    tolerances: Tolerances
    max_abs_logits: float
    max_abs_probs: float
    top1_agreement: float
    confident_disagreements: List[str]
    failures: List[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_json(self) -> Dict:
        data = dataclasses.asdict(self)
        data["ok"] = self.ok
        return data


def skimage_photos() -> List[Tuple[str, np.ndarray]]:
    """The photos scikit-image ships, as uint8 RGB arrays."""
    try:
        import skimage.data as data
    except ImportError as e:
        raise ImportError(f"scikit-image is not importable ({e}); pip install scikit-image, or pass --images") from e
    photos = []
    for name in SKIMAGE_PHOTOS:
        image = getattr(data, name)()
        if isinstance(image, tuple):  # stereo pairs: take the left view
            image = image[0]
        photos.append((name, _to_rgb(np.asarray(image))))
    return photos


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8))


def load_images(paths: Sequence[str]) -> List[Tuple[str, np.ndarray]]:
    """Decodes image files (local or gs://) to uint8 RGB arrays."""
    import io

    from PIL import Image

    from engines import storage

    images = []
    for path in paths:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
            images.append((os.path.basename(path), np.asarray(image.convert("RGB"))))
    return images


def resize_center_crop(image: np.ndarray, height: int, width: Optional[int] = None) -> np.ndarray:
    """The pipeline's own resize-and-crop (:func:`images.pillow_decoder.resize_and_crop`) to a
    ``height`` x ``width`` model input (``width`` default: ``height``, a square), the shorter side
    first resized to 256/224 of the crop's longer side (256 for 224), as the pipeline's defaults do."""
    from PIL import Image

    from images.pillow_decoder import PreprocessConfig, resize_and_crop

    width = height if width is None else width
    config = PreprocessConfig(resize=round(max(height, width) * 256 / 224), crop=height, crop_width=width)
    return resize_and_crop(Image.fromarray(image), config)


def batch_for(spec: TensorSpec, images: Sequence[np.ndarray]) -> np.ndarray:
    """Stacks images into the model's input layout (NHWC or NCHW, 3 channels).

    Raises:
        EngineError: the input is not a 4-d image tensor with 3 channels.
    """
    shape = spec.shape
    if len(shape) != 4 or (shape[3] != 3 and shape[1] != 3):
        raise EngineError(f"Input tensor: {spec.name} | {spec.describe()} is not an image batch (N,H,W,3) or "
                          f"(N,3,H,W); validate needs an image classifier")
    nchw = shape[3] != 3
    height, width = (shape[2], shape[3]) if nchw else (shape[1], shape[2])
    if height < 1 or width < 1:
        raise EngineError(f"Input tensor: {spec.name} | {spec.describe()} is not an image of fixed height and "
                          f"width; validate crops images of the model's size as the pipeline does (--crop)")
    batch = np.stack([resize_center_crop(image, height, width) for image in images])
    if nchw:
        batch = batch.transpose(0, 3, 1, 2)
    if spec.dtype.kind == "f":  # raw 0..255 values; the model is expected to normalise
        return np.ascontiguousarray(batch.astype(spec.dtype))
    if spec.dtype != np.uint8:
        raise EngineError(f"Input tensor: {spec.name} | dtype {spec.dtype} is not an image dtype (uint8 or float)")
    return np.ascontiguousarray(batch)


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def pick_output(specs: Dict[str, TensorSpec], name: Optional[str]) -> str:
    """The output to compare: ``name``, else "logits", else the first float output."""
    if name:
        if name not in specs:
            raise EngineError(f"Output tensor: {name} | not an output of the engine (outputs: {list(specs)})")
        return name
    if "logits" in specs:
        return "logits"
    for spec in specs.values():
        if spec.dtype.kind == "f":
            return spec.name
    raise EngineError(f"No float output to compare among {[s.describe() for s in specs.values()]}; pass --output_name")


def _prepared_inputs(candidate: Engine, reference: Engine,
                     preprocessing: Preprocessing) -> Tuple[TensorSpec, TensorSpec, Callable]:
    """The candidate's uint8 NHWC input, the reference's own input, and the numpy conversion between them.

    Raises:
        EngineError: the candidate does not take uint8 NHWC images of the reference's size.
    """
    (ref_spec,), (cand_spec,) = reference.input_specs.values(), candidate.input_specs.values()
    ref_input = image_input(ref_spec.name, ref_spec.dtype, ref_spec.shape, "the reference")
    cand_input = image_input(cand_spec.name, cand_spec.dtype, cand_spec.shape, "the candidate")
    if not cand_input.is_pipeline_contract or (cand_input.height, cand_input.width) != (ref_input.height,
                                                                                       ref_input.width):
        raise EngineError(f"With --mean/--std the candidate takes the pipeline's uint8 images of the reference's "
                          f"size, uint8 NHWC ({ref_input.height}, {ref_input.width}); it takes "
                          f"{cand_spec.describe()}. Write the candidate with python -m model_tools.prepare_model "
                          f"{preprocessing.flags()} (and build the plan from that file)")
    return cand_spec, ref_spec, lambda pixels: preprocess(pixels, ref_input, preprocessing, "the reference")


def compare(candidate: Engine, reference: Engine, images: Sequence[Tuple[str, np.ndarray]],
            precision: str = "fp32", tolerances: Optional[Tolerances] = None, output_name: Optional[str] = None,
            batch_size: int = 8, preprocessing: Optional[Preprocessing] = None) -> ValidationReport:
    """Runs both engines on the same images and compares one output.

    Args:
        candidate: The engine under test (TensorRT, or any :class:`Engine`).
        reference: The fp32 reference (ONNX Runtime).
        images: ``(name, uint8 RGB array)`` pairs.
        precision: "fp32" or "fp16"; picks the default tolerances. Default "fp32".
        tolerances: Overrides the defaults for ``precision``. Default None.
        output_name: Output to compare. Default: "logits", else the first float output.
        batch_size: Images per ``infer`` call. Default 8.
        preprocessing: The flags of a user's own float model: the reference gets the uint8 batch
            converted in numpy (``engines.model_adapter.preprocess``), the candidate (the model
            with that conversion in its graph) the uint8 batch. Default None: both get the same
            input.

    Raises:
        EngineError: the engines' inputs differ, or there are no images.
    """
    if not images:
        raise EngineError("No images to validate with")
    if precision not in DEFAULT_TOLERANCES:
        raise EngineError(f"precision must be one of {sorted(DEFAULT_TOLERANCES)}, got {precision!r}")
    tol = tolerances or DEFAULT_TOLERANCES[precision]
    in_name = next(iter(reference.input_specs))
    ref_spec, cand_spec = reference.input_specs[in_name], candidate.input_specs.get(in_name)
    convert = None
    if len(reference.input_specs) == 1 and len(candidate.input_specs) == 1 and preprocessing is not None:
        cand_spec, ref_spec, convert = _prepared_inputs(candidate, reference, preprocessing)
    elif len(reference.input_specs) != 1 or cand_spec is None or cand_spec.shape[1:] != ref_spec.shape[1:]:
        raise EngineError(f"The engines' inputs differ: candidate {[s.describe() for s in candidate.input_specs.values()]}"
                          f", reference {[s.describe() for s in reference.input_specs.values()]}")
    out = pick_output(reference.output_specs, output_name)
    pick_output(candidate.output_specs, out)
    got, want = [], []
    for start in range(0, len(images), batch_size):
        pixels = [image for _, image in images[start:start + batch_size]]
        batch = batch_for(cand_spec, pixels)
        got.append(candidate.infer({cand_spec.name: batch})[out])
        ref_batch = convert(batch) if convert else batch_for(ref_spec, pixels)
        want.append(reference.infer({ref_spec.name: ref_batch})[out])
    got_logits = np.concatenate(got).astype(np.float64)
    want_logits = np.concatenate(want).astype(np.float64)
    got_p, want_p = softmax(got_logits), softmax(want_logits)
    max_logits = float(np.max(np.abs(got_logits - want_logits)))
    max_probs = float(np.max(np.abs(got_p - want_p)))
    top_got, top_want = got_p.argmax(-1), want_p.argmax(-1)
    sorted_want = np.sort(want_p, axis=-1)
    margins = sorted_want[:, -1] - sorted_want[:, -2] if want_p.shape[-1] > 1 else np.ones(len(want_p))
    confident = [images[i][0] for i in range(len(images))
                 if top_got[i] != top_want[i] and margins[i] > 2 * tol.probs]
    failures = []
    if not np.isfinite(got_logits).all():
        failures.append("the candidate produced NaN or Inf")
    if max_logits > tol.logits:
        failures.append(f"max |logits diff| {max_logits:.4g} > {tol.logits:g}")
    if max_probs > tol.probs:
        failures.append(f"max |probability diff| {max_probs:.4g} > {tol.probs:g}")
    if confident:
        failures.append(f"top-1 differs where the reference is confident: {confident}")
    agreement = float(np.mean(top_got == top_want))
    if agreement < tol.min_top1:
        failures.append(f"top-1 agreement {agreement:.1%} < {tol.min_top1:.1%}")
    return ValidationReport(images=len(images), output=out, precision=precision, tolerances=tol,
                            max_abs_logits=max_logits, max_abs_probs=max_probs,
                            top1_agreement=agreement, confident_disagreements=confident,
                            failures=failures)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from model_tools.build import add_build_arguments

    parser = argparse.ArgumentParser(prog="python -m model_tools.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="tensorrt", choices=("tensorrt", "onnxruntime"),
                        help="The candidate engine kind. Default tensorrt.")
    parser.add_argument("--engine_path", default=None, help="TensorRT plan to validate.")
    parser.add_argument("--onnx_path", default=None,
                        help="ONNX model to build with TensorRT (or, with --engine onnxruntime, to run with ORT).")
    parser.add_argument("--engine_cache", default=None, help="With --onnx_path: the TensorRT engine cache.")
    parser.add_argument("--reference", required=True, help="The fp32 ONNX model, run with ONNX Runtime on CPU.")
    parser.add_argument("--images", nargs="*", default=None, help="Image files (default: scikit-image's photos).")
    parser.add_argument("--output_name", default=None, help="Output to compare (default logits / first float).")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16"),
                        help="Picks default tolerances; auto reads the sidecar or the build flags.")
    parser.add_argument("--atol_logits", type=float, default=None, help="Override the logits tolerance.")
    parser.add_argument("--atol_probs", type=float, default=None, help="Override the probability tolerance.")
    parser.add_argument("--min_top1", type=float, default=None,
                        help="Least top-1 agreement with the reference, 0..1 (default 0.9).")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per batch (default 8).")
    parser.add_argument("--num_contexts", type=int, default=2, help="TensorRT execution contexts (default 2).")
    parser.add_argument("--json", default=None, help="Also write the report as JSON here.")
    parser.add_argument("--mean", default=None,
                        help="With --std: the reference is a user's float model normalised with this per-colour "
                             "mean R,G,B (0-1 scale), fed the images converted in numpy; the candidate takes "
                             "uint8 (docs/own-model.md).")
    parser.add_argument("--std", default=None, help="Per-colour standard deviation R,G,B, with --mean.")
    parser.add_argument("--channel_order", default="rgb", choices=("rgb", "bgr"),
                        help="With --mean/--std: the channel order the reference model takes. Default rgb.")
    add_build_arguments(parser)
    return parser.parse_args(argv)


def _onnx_precision(path: str) -> str:
    import onnx

    from engines import storage

    model = onnx.load_model_from_string(storage.read_bytes(path))
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return "fp16" if fp16 else "fp32"


def _preprocessing(args: argparse.Namespace) -> Optional[Preprocessing]:
    """The own-model flags, or None when neither --mean nor --std was given (and the order is RGB)."""
    if args.mean is None and args.std is None and args.channel_order == "rgb":
        return None
    return Preprocessing.from_flags(args.mean, args.std, args.channel_order)


def _reference(path: str) -> Engine:
    """The reference on ONNX Runtime (CPU), with the weights torch's exporter writes beside a model
    (``model.onnx.data``): a user's own export is usually one."""
    from engines.model_adapter import load_model
    from engines.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(load_model(path, "--reference").SerializeToString(), name=path)


def make_candidate(args: argparse.Namespace) -> Tuple[Engine, str]:
    """The engine under test and its precision, from the flags."""
    from model_tools.build import options_from_args

    if args.engine == "onnxruntime":
        from engines.onnxruntime_engine import OnnxRuntimeLoader

        if not args.onnx_path or args.engine_path:
            raise UsageError("--engine onnxruntime runs --onnx_path (not --engine_path)")
        # The original or the prepared model, wrapped (--mean/--std) and converted (--precision fp16 of a
        # float32 model) as a job's loader does it.
        exported = _onnx_precision(args.onnx_path)
        convert = args.precision == "fp16" and exported == "fp32"
        loader = OnnxRuntimeLoader(args.onnx_path, preprocessing=_preprocessing(args),
                                   precision="fp16" if convert else "fp32")
        return loader(), args.precision if args.precision != "auto" else exported
    from engines.tensorrt.loader import TensorRTLoader

    if args.engine_path:
        loader = TensorRTLoader(engine_path=args.engine_path, num_contexts=args.num_contexts)
        info = loader.plan_info()
        if info:
            precision = info.precision
        else:
            precision = "fp16" if args.fp16 else "fp32"
            if args.precision == "auto":  # an explicit --precision wins in main()
                _LOG.info("no sidecar %s.json beside the plan: using %s tolerances (%s)", args.engine_path, precision,
                          "from --fp16" if args.fp16 else "pass --fp16 or --precision fp16 for an fp16 plan")
    else:
        options = options_from_args(args)
        loader = TensorRTLoader(onnx_path=args.onnx_path, engine_cache=args.engine_cache, build_options=options,
                                num_contexts=args.num_contexts)
        precision = options.precision
    return loader(), precision


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        images = load_images(args.images) if args.images else skimage_photos()
        candidate, precision = make_candidate(args)
        if args.precision != "auto":
            precision = args.precision
        base = DEFAULT_TOLERANCES[precision]
        tol = Tolerances(logits=base.logits if args.atol_logits is None else args.atol_logits,
                         probs=base.probs if args.atol_probs is None else args.atol_probs,
                         min_top1=base.min_top1 if args.min_top1 is None else args.min_top1)
        with candidate, _reference(args.reference) as reference:
            report = compare(candidate, reference, images, precision, tol, args.output_name, args.batch_size,
                             _preprocessing(args))
    except (UsageError, EngineError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report.images} images, output {report.output!r}, {report.precision}: max |logits diff| "
          f"{report.max_abs_logits:.4g} (tol {report.tolerances.logits:g}), max |prob diff| "
          f"{report.max_abs_probs:.4g} (tol {report.tolerances.probs:g}), top-1 agreement "
          f"{report.top1_agreement:.1%} (min {report.tolerances.min_top1:.0%})")
    if args.json:
        from engines import storage

        storage.write_bytes(args.json, (json.dumps(report.to_json(), indent=2) + "\n").encode("utf-8"))
    if not report.ok:
        print("FAILED: " + "; ".join(report.failures), file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
