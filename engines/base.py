"""The one small interface every engine implements.

An engine owns a loaded model and runs named tensors through it:
``infer({"images": uint8[N, 224, 224, 3]}) -> {"logits": float32[N, 1000]}``.
Nothing in this module imports an inference library; ``transforms/`` talks to
engines through :class:`Engine`, :class:`TensorSpec` and :class:`EngineError` (and the
pure image code; README, "How it is built").
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

#: One array per input name: numpy on the host, or a device-resident array exposing
#: ``__cuda_array_interface__`` (CuPy, DALI's TensorGPU, torch CUDA tensors), C-contiguous.
Feed = Mapping[str, Any]
#: One host numpy array per output name.
Outputs = Dict[str, np.ndarray]


class EngineError(Exception):
    """A user-facing error: bad model file, bad feed, missing library or device.

    The message says what failed, what was expected and the fix.
    """


class UsageError(Exception):
    """A command-line mistake: a flag missing, out of range, or at odds with another flag or the model.

    Kept apart from :class:`EngineError` (the model, the engine or a library failed) so callers
    and tests can tell the two apart; both stop a command at start with exit status 2. The
    message names the flag and the fix.
    """


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one engine input or output.

    Attributes:
        name: The tensor name in the model.
        dtype: The numpy dtype. Types numpy cannot represent (bf16, fp8) are
            carried as raw bytes of the right item size (``np.dtype("V2")``).
        shape: One entry per dimension; ``-1`` marks a dynamic dimension
            (dimension 0 is the batch dimension when dynamic).
    """

    name: str
    dtype: np.dtype
    shape: Tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def dynamic_batch(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] == -1

    def describe(self) -> str:
        dims = ", ".join("N" if i == 0 and d == -1 else ("?" if d == -1 else str(d))
                         for i, d in enumerate(self.shape))
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """Shape, dtype and place of one fed array, host or device.

    Attributes:
        shape: The array's shape.
        dtype: Its numpy dtype.
        device_ptr: The device address for a CUDA array, None for a host array.
    """

    shape: Tuple[int, ...]
    dtype: np.dtype
    device_ptr: Optional[int] = None

    @property
    def on_device(self) -> bool:
        return self.device_ptr is not None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def array_info(array) -> ArrayInfo:
    """Describes a host (numpy) or device (``__cuda_array_interface__``) array without copying it.

    Raises:
        EngineError: a device array that is not C-contiguous (engines bind one flat buffer).
    """
    cai = getattr(array, "__cuda_array_interface__", None)
    if cai is None:
        array = np.asarray(array)
        return ArrayInfo(tuple(array.shape), array.dtype)
    shape = tuple(int(d) for d in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is not None:
        expected, step = [], dtype.itemsize
        for dim in reversed(shape):
            expected.insert(0, step)
            step *= dim
        if tuple(strides) != tuple(expected) and 0 not in shape:
            raise EngineError(f"device array of shape {shape} is not C-contiguous (strides {tuple(strides)}); "
                              f"make it contiguous before feeding it")
    return ArrayInfo(shape, dtype, int(cai["data"][0]))


def is_device_array(array) -> bool:
    """True for an array on a CUDA device (it exposes ``__cuda_array_interface__``)."""
    return hasattr(array, "__cuda_array_interface__")


def check_feed(specs: Mapping[str, TensorSpec], feed: Feed) -> int:
    """Validates a feed against input specs and returns its batch size.

    Args:
        specs: The engine's input specs by name.
        feed: The arrays to run, by input name.

    Returns:
        The batch size (dimension 0), shared by every input.

    Raises:
        EngineError: a missing or unexpected input, a wrong dtype, rank or
            fixed dimension, or inputs whose batch sizes differ.
    """
    missing = [name for name in specs if name not in feed]
    extra = [name for name in feed if name not in specs]
    if missing or extra:
        raise EngineError(
            f"Feed does not match the model inputs | missing: {missing} | unexpected: {extra}. "
            f"Note: the model expects {[s.describe() for s in specs.values()]}")
    batch = None
    for name, spec in specs.items():
        array = array_info(feed[name])
        if array.dtype != spec.dtype:
            raise EngineError(
                f"Input tensor: {name} | Received unexpected dtype: {array.dtype}. "
                f"Note: Expected type: {spec.dtype}")
        if len(array.shape) != len(spec.shape):
            raise EngineError(
                f"Input tensor: {name} | Received shape {tuple(array.shape)} with rank {len(array.shape)}. "
                f"Note: Expected {spec.describe()}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
            if want != -1 and got != want:
                raise EngineError(
                    f"Input tensor: {name} | Received shape {tuple(array.shape)}, dimension {axis} is "
                    f"{got}. Note: Expected {spec.describe()}")
        if array.shape:
            if batch is None:
                batch = array.shape[0]
            elif array.shape[0] != batch:
                raise EngineError(
                    f"Input tensor: {name} | batch size {array.shape[0]} differs from the other "
                    f"inputs' batch size {batch}. Note: every input must carry the same batch")
    return int(batch or 0)


class Engine(abc.ABC):
    """A loaded model that runs batches of named tensors.

    Engines are context managers; ``close()`` frees what ``__init__`` took.
    One engine may be called from several threads at once: implementations
    either are thread-safe or serialize internally.
    """

    #: Short name used in stats and logs ("onnxruntime", "tensorrt").
    kind: str = "engine"
    #: Input and output specs by name, in model order: set by each engine when it loads (or
    #: override :attr:`input_specs` / :attr:`output_specs`).
    _inputs: Dict[str, TensorSpec]
    _outputs: Dict[str, TensorSpec]

    @property
    def input_specs(self) -> Dict[str, TensorSpec]:
        """Input specs by name, in model order (a copy)."""
        return dict(self._inputs)

    @property
    def output_specs(self) -> Dict[str, TensorSpec]:
        """Output specs by name, in model order (a copy)."""
        return dict(self._outputs)

    @property
    def max_batch_size(self) -> Optional[int]:
        """The largest batch one ``infer`` call takes, or None when unbounded."""
        return None

    # Plain methods, not properties: Beam's cross-process shared-model proxy
    # (share_model_across_processes) forwards only method calls.
    def input_names(self) -> List[str]:
        """Input names in model order."""
        return list(self.input_specs)

    def batch_limit(self) -> Optional[int]:
        """The largest batch the caller must respect, or None when ``infer`` takes any batch
        (an engine that splits batches itself, like the TensorRT engine, returns None)."""
        return self.max_batch_size

    @abc.abstractmethod
    def infer(self, feed: Feed, outputs: Optional[Sequence[str]] = None) -> Outputs:
        """Runs one batch.

        Args:
            feed: One array per input name, all with the same batch size: numpy arrays, or
                device-resident arrays (``__cuda_array_interface__``), which a GPU engine
                reads where they are, with no host round trip.
            outputs: The output names to return (only these are copied to the host).
                Default None: every output.

        Returns:
            One host numpy array per requested output name, with the batch as dimension 0.

        Raises:
            EngineError: the feed does not match ``input_specs``.
        """

    def device_index(self) -> Optional[int]:
        """The GPU the engine runs on (a decoder feeding it device arrays must use the same one),
        or None on the CPU. A plain method so Beam's shared-model proxy forwards it."""
        return None

    def concurrent_calls(self) -> int:
        """How many ``infer`` calls the engine runs at once (ONNX Runtime's sessions, TensorRT's execution
        contexts); more callers wait for one to be free. Default 1."""
        return 1

    def _output_names(self, outputs: Optional[Sequence[str]]) -> List[str]:
        """The requested output names (all when None), checked against the model's outputs.

        Raises:
            EngineError: a name that is not an output of the model.
        """
        if outputs is None:
            return list(self.output_specs)
        unknown = [name for name in outputs if name not in self.output_specs]
        if unknown:
            raise EngineError(f"Output tensor(s) {unknown} are not outputs of the model; its outputs are "
                              f"{list(self.output_specs)}")
        return list(outputs)

    def describe(self) -> Dict[str, Any]:
        """A JSON-able summary for stats and logs."""
        return {
            "engine": self.kind,
            "inputs": [s.describe() for s in self.input_specs.values()],
            "outputs": [s.describe() for s in self.output_specs.values()],
        }

    def close(self) -> None:
        """Frees the engine's resources. Safe to call twice."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: A picklable callable that loads an engine on the worker (Polygraphy's loader pattern).
EngineLoader = Callable[[], Engine]


@dataclasses.dataclass(frozen=True)
class EngineRecipe:
    """What a job needs to know about its engine before any worker loads it.

    Attributes:
        loader: Picklable callable that loads the engine on the worker.
        batch_size: Images per batch this engine should get (the one batch-size decision).
        info: JSON-able description for stats.json and logs.
        labels: Class names the engine's own artefact carries (a TensorRT plan's sidecar), or None.
        labels_model: An ONNX model whose ``labels`` metadata holds them, or None.
        labels_flag: The flag that named ``labels_model`` (for error messages).
    """

    loader: EngineLoader
    batch_size: int
    info: Dict[str, Any]
    labels: Optional[List[str]] = None
    labels_model: Optional[str] = None
    labels_flag: str = "--model"


@dataclasses.dataclass(frozen=True)
class WorkerPath:
    """A file or folder an engine flag names that the workers open, so it must be reachable from them.

    Attributes:
        flag: The flag, e.g. "--onnx_path".
        path: Its value, or None when the flag was not given and its default is a file on the
            launching machine (then ``default`` says which).
        written: The workers write it (a cache); False: they only read it.
        default: With ``path`` None: what the default is, for the message. Default "".
        note: More for the message: what must be uploaded with it (a plan's sidecar), or where the
            default file is. Default "".
    """

    flag: str
    path: Optional[str]
    written: bool = False
    default: str = ""
    note: str = ""


def import_optional(module: str, install_hint: str):
    """Imports an optional heavy dependency or raises an ImportError with the fix.

    Args:
        module: Dotted module name, e.g. ``"tensorrt"``.
        install_hint: What to install, and where, if the import fails.

    Raises:
        ImportError: naming the module and the fix.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is not importable ({e}). {install_hint}") from e
