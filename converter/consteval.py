"""Constant expressions: the output of a standard-domain node whose inputs are all constants is a constant too.

``nn.Linear`` exports as ``MatMul(x, Transpose(W))``; other exporters reshape, cast, concatenate or slice stored
parameters, caffe2 exports build every weight with ``ConstantOfShape``, and PyTorch's dynamo exporter gives a
bias-free conv a zero bias from ``Shape``/``Expand``. Two evaluators, each following the ONNX operator of the
model's opset:

* :func:`evaluate`: the ops of :data:`OPS` (shape and selection ops), in numpy, fast;
* :func:`evaluate_node`: any other deterministic standard-domain op without subgraphs (``ConstantOfShape``,
  ``Expand``, ``Tile``, ``Range``, ``Where``, ``DequantizeLinear``, arithmetic, ...), on the node alone, with ONNX
  Runtime (the runtime the result is verified in), else the ONNX reference evaluator (``onnx.reference``).

Neither produces a value of more than :data:`MAX_ELEMENTS` elements: ``ConstantOfShape``, ``Expand``, ``Tile``
and ``Range`` are sized before they run, every other result after. A value that is not evaluated stays what it
is in the graph, never a guess, and :func:`evaluate_node` says why (the bound, a random or custom op, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import AttributeProto, ModelProto, NodeProto, TensorProto, helper

Array = NDArray[Any]

#: Ops whose output is a constant when their inputs are (``Constant`` itself is read by the graph index).
OPS = frozenset(
    {"Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Cast", "Concat", "Slice", "Gather"}
)

#: Largest constant the evaluators produce (elements; 512 MiB of float32): bigger expressions stay what they are.
MAX_ELEMENTS = 1 << 27

#: Standard ops that are never evaluated: random values, and ops whose outputs are not plain tensors.
NOT_EVALUATED = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "If",
        "Loop",
        "Scan",
        "Constant",  # read by the graph index itself
        "BatchNormalization",  # onnx.reference's opset 9-13 version normalises with the batch's own statistics
    }
)

CASTABLE = {
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.INT8,
    TensorProto.INT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.UINT8,
    TensorProto.UINT16,
    TensorProto.UINT32,
    TensorProto.UINT64,
    TensorProto.BOOL,
}


def cast_to(value: Array, dtype: Any) -> Array | None:
    """``value`` cast to a numpy dtype of :data:`CASTABLE` (None for a value numpy cannot cast: strings)."""
    return value.astype(dtype) if value.dtype.kind in "fiub" else None


def evaluate(node: NodeProto, inputs: Sequence[Array | None], opset: int) -> Array | None:
    """The first output of ``node`` given its constant inputs (None for an absent optional one), or None."""
    fn = _EVAL.get(node.op_type)
    if fn is None or node.domain not in ("", "ai.onnx"):
        return None
    try:
        out = fn(node, list(inputs), opset)
    except (ValueError, IndexError, TypeError, KeyError):  # a malformed node: not a constant we can vouch for
        return None
    if out is None or out.size > MAX_ELEMENTS:
        return None
    return np.ascontiguousarray(out)


def attribute(node: NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def int_attribute(node: NodeProto, name: str, default: int) -> int:
    value = attribute(node, name, default)
    return int(value) if isinstance(value, int) else default


def ints_attribute(node: NodeProto, name: str) -> list[int]:
    """A list-of-ints attribute; [] when absent."""
    return _ints(attribute(node, name, []))


def _ints(value: object) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else []


def _axes(node: NodeProto, inputs: list[Array | None], opset: int, since: int) -> list[int] | None:
    """``axes`` from the attribute (before ``since``) or the second input (from ``since``); None when absent."""
    if opset < since:
        value = attribute(node, "axes")
        return None if value is None else _ints(value)
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in np.asarray(inputs[1]).reshape(-1)]
    return None


def _identity(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    return x[0]


def _transpose(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data = x[0]
    if data is None:
        return None
    perm = attribute(node, "perm")
    return np.transpose(data, _ints(perm) if perm is not None else None)


def _reshape(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data = x[0]
    if data is None:
        return None
    if opset < 5:
        shape = _ints(attribute(node, "shape", []))
    elif len(x) > 1 and x[1] is not None:
        shape = [int(d) for d in np.asarray(x[1]).reshape(-1)]
    else:
        return None
    if not attribute(node, "allowzero", 0):
        shape = [data.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return data.reshape(shape)


def _unsqueeze(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data, axes = x[0], _axes(node, x, opset, 13)
    if data is None or axes is None:
        return None
    rank = data.ndim + len(axes)
    out = data
    for a in sorted(a + rank if a < 0 else a for a in axes):
        out = np.expand_dims(out, a)
    return out


def _squeeze(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data = x[0]
    if data is None:
        return None
    axes = _axes(node, x, opset, 13)
    if axes is None:
        return np.squeeze(data)
    normalised = tuple(a + data.ndim if a < 0 else a for a in axes)
    if any(data.shape[a] != 1 for a in normalised):
        return None
    return np.squeeze(data, axis=normalised)


def _flatten(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data = x[0]
    if data is None:
        return None
    axis = int_attribute(node, "axis", 1)
    axis = axis + data.ndim if axis < 0 else axis
    outer = int(np.prod(data.shape[:axis], dtype=np.int64))
    return data.reshape(outer, -1) if data.size else data.reshape(outer, int(np.prod(data.shape[axis:])))


def _cast(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data = x[0]
    to = attribute(node, "to")
    if data is None or not isinstance(to, int) or to not in CASTABLE or data.dtype.kind not in "fiub":
        return None
    return data.astype(helper.tensor_dtype_to_np_dtype(to))


def _concat(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    if not x or any(v is None for v in x):
        return None
    return np.concatenate([v for v in x if v is not None], axis=int_attribute(node, "axis", 0))


def _slice(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data = x[0]
    if data is None:
        return None
    if opset < 10:
        starts, ends = _ints(attribute(node, "starts", [])), _ints(attribute(node, "ends", []))
        axes_attr = attribute(node, "axes")
        axes = _ints(axes_attr) if axes_attr is not None else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        if len(x) < 3 or x[1] is None or x[2] is None:
            return None
        starts, ends = [int(v) for v in x[1].reshape(-1)], [int(v) for v in x[2].reshape(-1)]
        axes = [int(v) for v in x[3].reshape(-1)] if len(x) > 3 and x[3] is not None else list(range(len(starts)))
        steps = [int(v) for v in x[4].reshape(-1)] if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = data
    for first, last, along, step in zip(starts, ends, axes, steps, strict=True):
        axis = along + data.ndim if along < 0 else along
        dim = data.shape[axis]
        if step == 0:
            return None
        start = first + dim if first < 0 else first
        end = last + dim if last < 0 else last
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        out = np.take(out, np.arange(start, end, step, dtype=np.int64), axis=axis)
    return out


def _gather(node: NodeProto, x: list[Array | None], opset: int) -> Array | None:
    data, indices = x[0], x[1] if len(x) > 1 else None
    if data is None or indices is None or indices.dtype.kind not in "iu":
        return None
    axis = int_attribute(node, "axis", 0)
    axis = axis + data.ndim if axis < 0 else axis
    idx = np.asarray(indices, dtype=np.int64)
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    if np.any(idx < 0) or np.any(idx >= data.shape[axis]):
        return None
    return np.take(data, idx, axis=axis)


_EVAL: dict[str, Callable[[NodeProto, list[Array | None], int], Array | None]] = {
    "Identity": _identity,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Cast": _cast,
    "Concat": _concat,
    "Slice": _slice,
    "Gather": _gather,
}


class NotConstant(str):
    """Why a node's outputs are not evaluated: a clause that reads after "the value is" ("computed by ...")."""


def evaluable(node: NodeProto) -> bool:
    """True for a node :func:`evaluate_node` may run: standard domain, deterministic, no subgraph, no sequences."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in NOT_EVALUATED
        and not node.op_type.startswith(("Sequence", "Optional"))
        and node.op_type not in ("SplitToSequence", "ConcatFromSequence")
        and not any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)
    )


def why_not_evaluable(node: NodeProto) -> NotConstant:
    if node.domain not in ("", "ai.onnx"):
        return NotConstant(f"computed by {node.domain}.{node.op_type}, outside the standard ONNX domain")
    if node.op_type.startswith("Random") or node.op_type in ("Multinomial", "Bernoulli"):
        return NotConstant(f"computed by {node.op_type}, which draws random values")
    return NotConstant(
        f"computed by {node.op_type}, which constant evaluation does not run (control flow, sequences, BatchNorm)"
    )


def predicted_elements(node: NodeProto, inputs: Sequence[Array | None]) -> int | None:
    """The element count of the first output of the ops that build big tensors from small ones, before running."""
    try:
        if node.op_type == "ConstantOfShape" and inputs and inputs[0] is not None:
            return int(np.prod(np.asarray(inputs[0], dtype=np.int64), dtype=object))
        if node.op_type == "Expand" and len(inputs) > 1 and inputs[0] is not None and inputs[1] is not None:
            shape = [int(d) for d in np.asarray(inputs[1]).reshape(-1)]
            rank = max(len(shape), inputs[0].ndim)
            a = [1] * (rank - inputs[0].ndim) + list(inputs[0].shape)
            b = [1] * (rank - len(shape)) + shape
            return int(np.prod([max(x, y) for x, y in zip(a, b, strict=True)], dtype=object))
        if node.op_type == "Tile" and len(inputs) > 1 and inputs[0] is not None and inputs[1] is not None:
            return int(inputs[0].size * np.prod(np.asarray(inputs[1], dtype=np.int64), dtype=object))
        if node.op_type == "Range" and len(inputs) > 2 and all(v is not None for v in inputs[:3]):
            start, limit, delta = (float(np.asarray(v).reshape(-1)[0]) for v in inputs[:3])
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else None
    except (ValueError, TypeError, OverflowError):
        return None
    return None


def too_big(node: NodeProto, elements: int) -> NotConstant:
    return NotConstant(
        f"computed by {node.op_type} {node.name or node.output[0]}, which would make {elements:,} elements, above "
        f"the constant-evaluation bound of {MAX_ELEMENTS:,}"
    )


def evaluate_node(node: NodeProto, inputs: Sequence[Array | None], opset: int) -> list[Array] | NotConstant:
    """Every output of an :func:`evaluable` node given its constant inputs (None for an absent optional one),
    run alone at the model's opset by ONNX Runtime (the runtime the result is verified in), or by the ONNX
    reference evaluator where ONNX Runtime cannot run it; or why not."""
    predicted = predicted_elements(node, inputs)
    if predicted is not None and predicted > MAX_ELEMENTS:
        return too_big(node, predicted)
    names = [f"in{i}" for i in range(len(node.input))]
    call = NodeProto()
    call.CopyFrom(node)
    call.name = "eval"
    del call.input[:]
    call.input.extend(n if node.input[i] else "" for i, n in enumerate(names))
    del call.output[:]
    call.output.extend(f"out{i}" if o else "" for i, o in enumerate(node.output))
    feeds = {n: v for n, v, given in zip(names, inputs, node.input, strict=True) if given and v is not None}
    graph = helper.make_graph(
        [call],
        "consteval",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in feeds.items()],
        [helper.make_empty_tensor_value_info(o) for o in call.output if o],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    results: list[Any] | None = None
    failures = []
    for run in (_run_onnxruntime, _run_reference):
        try:
            results = run(model, feeds)
            break
        except Exception as exc:  # a runtime lacking the op (at this opset) or refusing the node: try the next
            text = str(exc).strip()
            failures.append(text.splitlines()[0][:160] if text else type(exc).__name__)
    if results is None:
        return NotConstant(
            f"computed by {node.op_type}, which neither ONNX Runtime nor the ONNX reference evaluator could run "
            f"({failures[0]}; {failures[1]})"
        )
    out = []
    for value in results:
        if not isinstance(value, np.ndarray | np.generic):
            return NotConstant(f"computed by {node.op_type}, whose output is not a tensor")
        array = np.ascontiguousarray(value)
        if array.size > MAX_ELEMENTS:
            return too_big(node, int(array.size))
        out.append(array)
    return out


def _run_onnxruntime(model: ModelProto, feeds: dict[str, Array]) -> list[Any]:
    import onnxruntime as ort  # noqa: PLC0415 (loaded only when a model needs it)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def _run_reference(model: ModelProto, feeds: dict[str, Array]) -> list[Any]:
    from onnx.reference import ReferenceEvaluator  # noqa: PLC0415 (loaded only when a model needs it)

    return list(ReferenceEvaluator(model).run(None, feeds))
