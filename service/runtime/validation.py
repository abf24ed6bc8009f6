"""A decoded request checked against the model it names: input names, datatypes, shapes, batch size, and the
outputs it asks for. Every refusal is a :class:`~service.errors.BadRequest` whose text is the same whichever
transport carried the request."""

from __future__ import annotations

import numpy as np

from service.errors import BadRequest
from service.runtime.model import LoadedModel
from service.v2.tensors import Array, InferRequest, InputTensor, TensorSpec


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
