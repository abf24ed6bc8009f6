"""ONNX Runtime's results as the request asked for them: numpy arrays, or top-k classification strings."""

from __future__ import annotations

import numpy as np

from service.errors import BadRequest
from service.runtime.model import LoadedModel
from service.v2.tensors import Array, InferRequest, OutputTensor


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
