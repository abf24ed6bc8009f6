"""One request's run against its model (:class:`Work`), and what computes it (:class:`Compute`).

The run step of an inference, in this order:

1. :func:`prepare`, on the event loop before the work queues: the decoded request checked against the model
   (input names, datatypes, shapes, batch size, the outputs it asks for) into ONNX Runtime feeds. Every refusal
   is a :class:`~service.errors.BadRequest` whose text is the same whichever transport carried the request.
2. In a compute thread: :func:`compute`, the one place a request reaches ONNX Runtime;
3. then :meth:`Work.finish`: the outputs as the request asked for them (arrays, or Triton's top-k
   classification), and last the transport's encoder, so the event loop never serializes a response.

The scheduler runs one work at a time per thread; a batcher reads ``feeds`` and ``outputs`` of several works,
runs :func:`compute` once on their concatenation and calls each work's :meth:`Work.finish` on its own rows. Both
implement :class:`Compute`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from converter.errors import first_line
from service.errors import BadRequest, Internal, Timeout
from service.v2.tensors import Array, Encoder, InferRequest, InferResult, InputTensor, OutputTensor, TensorSpec

if TYPE_CHECKING:
    from service.runtime.model import LoadedModel

T = TypeVar("T")


class Compute(Protocol):
    """What runs works: :class:`~service.runtime.scheduler.Scheduler` or :class:`~service.runtime.batcher.Batcher`."""

    async def run(self, work: Work[T], deadline: float | None) -> tuple[T, float]:
        """The work's encoded answer and the seconds it waited in the queue. ``deadline`` is a
        ``time.monotonic()`` value: a work still queued then is answered :class:`~service.errors.Timeout`."""
        ...


@dataclass
class Timing:
    compute_seconds: float = 0.0


@dataclass
class Work(Generic[T]):
    """Validated feeds in, the transport's encoded answer out."""

    model: LoadedModel
    request: InferRequest
    feeds: dict[str, Array]
    outputs: list[str]
    encode: Encoder[T]
    run_options: ort.RunOptions | None = None
    timing: Timing = field(default_factory=Timing)

    def __call__(self) -> T:
        """Compute and encode (blocking: a compute thread)."""
        return self.finish(compute(self.model, self.feeds, self.outputs, self.run_options, self.timing))

    def finish(self, arrays: list[Array]) -> T:
        """The computed ``outputs`` as the request asked for them (classification), then encoded."""
        model, request = self.model, self.request
        tensors = output_tensors(model, request, self.outputs, arrays)
        return self.encode(InferResult(model.name, model.version, request.id, tensors))

    def stoppable(self) -> None:
        """Let :meth:`stop` end a running computation early (ONNX Runtime's ``RunOptions.terminate``)."""
        self.run_options = ort.RunOptions()

    def stop(self) -> None:
        if self.run_options is not None:
            self.run_options.terminate = True


# ------------------------------------------------------------------------------- the request against the model
def prepare(model: LoadedModel, request: InferRequest, encode: Encoder[T]) -> Work[T]:
    """The work of a decoded request, after checking it against the model (:class:`BadRequest` if it does not fit)."""
    return Work(model, request, check_inputs(model, request), check_outputs(model, request), encode)


def check_inputs(model: LoadedModel, request: InferRequest) -> dict[str, Array]:
    """The ONNX Runtime feeds of a request, after checking every input against the model."""
    feeds: dict[str, Array] = {}
    for tensor in request.inputs:
        spec = model.inputs_by_name.get(tensor.name)
        if spec is None:
            expected = ", ".join(model.inputs_by_name)
            raise BadRequest(f"model '{model.name}' has no input '{tensor.name}' (inputs: {expected})")
        if tensor.name in feeds:
            raise BadRequest(f"input '{tensor.name}' is given twice")
        if tensor.datatype != spec.datatype:
            raise BadRequest(f"input '{tensor.name}' has datatype {tensor.datatype}, the model takes {spec.datatype}")
        check_shape(model, spec, tensor.shape)
        feeds[tensor.name] = _as_text(tensor) if spec.datatype == "BYTES" else tensor.array
    missing = [n for n in model.inputs_by_name if n not in feeds]
    if missing:
        raise BadRequest(f"missing input(s) for model '{model.name}': {', '.join(missing)}")
    return feeds


def check_outputs(model: LoadedModel, request: InferRequest) -> list[str]:
    """The output names to compute: the requested ones (each must exist), or all of them."""
    if request.outputs is None:
        return model.output_names
    names = []
    for wanted in request.outputs:
        if wanted.name not in model.outputs_by_name:
            expected = ", ".join(model.output_names)
            raise BadRequest(f"model '{model.name}' has no output '{wanted.name}' (outputs: {expected})")
        names.append(wanted.name)
    return names


def check_shape(model: LoadedModel, spec: TensorSpec, shape: tuple[int, ...]) -> None:
    if len(shape) != len(spec.shape):
        raise BadRequest(f"input '{spec.name}' has shape {list(shape)}, the model takes {list(spec.shape)}")
    for axis, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if axis == 0 and model.max_batch_size > 0:
            if not 1 <= got <= model.max_batch_size:
                raise BadRequest(
                    f"input '{spec.name}' has batch size {got}; the model's max batch size is {model.max_batch_size}"
                )
            if want >= 0 and got != want:
                raise BadRequest(f"input '{spec.name}' has shape {list(shape)}, the model takes {list(spec.shape)}")
        elif want >= 0 and got != want:
            raise BadRequest(f"input '{spec.name}' has shape {list(shape)}, the model takes {list(spec.shape)}")
        elif want < 0 and got < 1:
            raise BadRequest(f"input '{spec.name}' has an empty dimension {axis} in shape {list(shape)}")


def _as_text(tensor: InputTensor) -> Array:
    """ONNX string tensors hold UTF-8 text; ONNX Runtime takes them as Python str."""
    try:
        values = [v.decode() if isinstance(v, bytes) else v for v in tensor.array.ravel()]
    except UnicodeDecodeError:
        raise BadRequest(f"input '{tensor.name}': BYTES elements must be UTF-8 text for this model") from None
    return np.array(values, dtype=object).reshape(tensor.array.shape)


# ----------------------------------------------------------------------------------------------- compute
def compute(
    model: LoadedModel, feeds: dict[str, Array], names: list[str], run_options: ort.RunOptions | None, timing: Timing
) -> list[Array]:
    """ONNX Runtime on validated feeds (blocking). ``run_options.terminate`` set meanwhile: Timeout."""
    start = time.perf_counter()
    try:
        return model.session.run(names, feeds, run_options)  # type: ignore[no-any-return]
    except ort_state.InvalidArgument as exc:
        raise BadRequest(f"model '{model.name}' rejected the inputs: {first_line(exc)}") from None
    except ort_state.Fail as exc:
        if run_options is not None and run_options.terminate:
            raise Timeout("request timeout expired during inference") from None
        raise Internal(f"inference failed: {first_line(exc)}") from None
    finally:
        timing.compute_seconds = time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- outputs
def output_tensors(
    model: LoadedModel, request: InferRequest, names: list[str], arrays: list[Array]
) -> list[OutputTensor]:
    """One :class:`OutputTensor` per computed output, with the model's datatype for it, classified (BYTES)
    where the request asked for it."""
    outputs = []
    wanted = request.outputs
    for i, (name, array) in enumerate(zip(names, arrays, strict=True)):
        spec = wanted[i] if wanted is not None else None
        binary = spec.binary if spec is not None else request.binary_output
        value, datatype = np.asarray(array), model.outputs_by_name[name].datatype
        if spec is not None and spec.classification:
            value, datatype = classify(model, name, value, spec.classification), "BYTES"
        outputs.append(OutputTensor(name, value, binary, datatype))
    return outputs


def classify(model: LoadedModel, name: str, array: Array, count: int) -> Array:
    """Triton's classification extension: top-``count`` as ``"value:index[:label]"`` BYTES."""
    if array.dtype.kind not in "iuf":
        raise BadRequest(f"output '{name}' is {array.dtype}; classification needs numbers")
    batched = model.max_batch_size > 0 and array.ndim > 0
    rows = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    k = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    labels = model.config.labels.get(name, [])
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        for j, idx in enumerate(order[r]):
            text = f"{rows[r, idx]!s}:{idx}"
            if idx < len(labels):
                text += f":{labels[idx]}"
            out[r, j] = text.encode()
    return out if batched else out.reshape(k)
