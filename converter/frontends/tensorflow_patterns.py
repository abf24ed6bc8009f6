"""TensorFlow exports in the standard form: move per-channel Mul/Add next to the layer that can absorb them.

Keras 3 runs BatchNormalization at inference as ``tf.nn.batch_normalization``: ``x·s + t`` with
``s = γ·rsqrt(var + ε)`` and ``t = β − μ·s`` (constants once the graph is frozen). tf2onnx writes that as
``Mul(s)`` then ``Add(t)`` — on the channels-last tensor, i.e. after the ``Transpose`` that takes a Conv's
NCHW output back to NHWC, or after the ``Squeeze`` that turns Conv1D's 2-D convolution back into 1-D, or
after ``MatMul`` + ``Add(bias)`` for a Dense layer. :mod:`converter.rules` folds a Mul/Add chain that reads a
Conv, ConvTranspose or Gemm output directly, with the channel on axis 1. Two rewrites bring TensorFlow's
forms there; both are exact (they only reorder elementwise work), and the conversion verifies the result
against the unrewritten export and against TensorFlow itself:

- :func:`commute_layout`: ``Transpose|Squeeze|Unsqueeze → Mul/Add(constant c)`` becomes
  ``Mul/Add(c′) → Transpose|Squeeze|Unsqueeze`` with c′ laid out like the layout op's input: for Transpose with
  ``perm`` p, ``c′ = transpose(c, argsort(p))``; for Squeeze, c with the squeezed axes re-inserted; for
  Unsqueeze, c without the inserted axes (only when c is 1 on them, so nothing broadcasts differently).
- :func:`matmul_to_gemm`: ``MatMul(x, W)`` [``+ Add(b)``] with a 2-D x, a constant 2-D W and a per-column
  constant b, read by a constant Mul or Add, becomes ``Gemm(x, W[, b])``: the same product, now a producer the
  chain rule knows.

This module needs no TensorFlow: it works on the ONNX graph.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, NodeProto, helper

from converter.folding import FOLDABLE_DTYPES
from converter.graph import Graph, attribute
from converter.shapes import ValueInfo

log = logging.getLogger("bnfold.converter")

LAYOUT_OPS = ("Transpose", "Squeeze", "Unsqueeze")
#: Ops a Mul/Add is moved towards: producers :mod:`converter.rules` folds into, and the chain's own nodes.
_TOWARDS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Mul", "Add", *LAYOUT_OPS)


def canonicalise(model: ModelProto) -> dict[str, int]:
    """Apply both rewrites in place until nothing changes; return how many of each were made."""
    counts = {"moved": 0, "gemm": 0}
    g = Graph(model)
    info = ValueInfo(model)
    ranks: dict[str, int] = {}
    counts["gemm"] += matmul_to_gemm(g, info)
    while True:
        moved = commute_layout(g, info, ranks)
        if not moved:
            break
        counts["moved"] += moved
    g.commit()
    if any(counts.values()):
        log.info("canonicalised the TensorFlow export: %s", counts)
    return counts


def _rank(info: ValueInfo, ranks: dict[str, int], name: str) -> int | None:
    return ranks[name] if name in ranks else info.rank(name)


def _const_operand(g: Graph, node: NodeProto) -> tuple[int, NDArray[Any]] | None:
    """(position of the non-constant input, the constant) for a binary node with exactly one constant input."""
    if len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
        return None
    values = [g.constant(name) for name in node.input]
    if (values[0] is None) == (values[1] is None):
        return None
    pos = 0 if values[0] is None else 1
    const = values[1 - pos]
    assert const is not None
    if np.dtype(const.dtype) not in FOLDABLE_DTYPES:
        return None
    return pos, const


def _axes(g: Graph, node: NodeProto) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = g.constant(node.input[1])
        return None if value is None else [int(a) for a in np.asarray(value).reshape(-1)]
    axes = attribute(node, "axes", None)
    return None if axes is None else [int(a) for a in axes]  # type: ignore[attr-defined]


def _to_input_layout(g: Graph, layout: NodeProto, const: NDArray[Any], out_rank: int) -> NDArray[Any] | None:
    """The constant that, applied before ``layout``, has the effect ``const`` has after it; None if none does."""
    if const.ndim > out_rank:
        return None
    c = const.reshape((1,) * (out_rank - const.ndim) + const.shape)
    if layout.op_type == "Transpose":
        perm = attribute(layout, "perm", None)
        p = list(perm) if perm is not None else list(reversed(range(out_rank)))  # type: ignore[call-overload]
        if sorted(p) != list(range(out_rank)):
            return None
        return np.transpose(c, np.argsort(p))
    axes = _axes(g, layout)
    if axes is None:
        return None
    if layout.op_type == "Squeeze":
        in_rank = out_rank + len(axes)
        norm = sorted(a % in_rank for a in axes)
        for a in norm:
            c = np.expand_dims(c, a)
        return c
    norm = sorted(a % out_rank for a in axes)  # Unsqueeze: axes index the output
    if any(c.shape[a] != 1 for a in norm):
        return None
    return c.reshape(tuple(d for i, d in enumerate(c.shape) if i not in norm))


def commute_layout(g: Graph, info: ValueInfo, ranks: dict[str, int]) -> int:
    """Move each constant Mul/Add that reads a layout op's only output to before that layout op."""
    moved = 0
    for idx, node in list(g.live_nodes()):
        if idx in g.removed or node.op_type not in ("Mul", "Add"):
            continue
        found = _const_operand(g, node)
        if found is None:
            continue
        pos, const = found
        x = node.input[pos]
        lidx = g.producer(x)
        if lidx is None or g.sole_reader(x) != idx:
            continue
        layout = g.node(lidx)
        if layout.op_type not in LAYOUT_OPS or layout.domain not in ("", "ai.onnx") or len(layout.output) != 1:
            continue
        source = layout.input[0]
        upstream = g.producer(source)
        if upstream is None or g.node(upstream).op_type not in _TOWARDS:
            continue
        out_rank, in_rank = _rank(info, ranks, x), _rank(info, ranks, source)
        if out_rank is None or in_rank is None:
            continue
        c_in = _to_input_layout(g, layout, const, out_rank)
        if c_in is None or c_in.ndim != in_rank:
            continue
        const_name = g.add_initializer(f"{node.name or node.output[0]}_c", np.ascontiguousarray(c_in))
        moved_out = g.unique_name(f"{node.output[0]}_before_{layout.op_type.lower()}")
        inputs = [source, const_name] if pos == 0 else [const_name, source]
        new_op = helper.make_node(node.op_type, inputs, [moved_out], name=node.name or None)
        new_layout = NodeProto()
        new_layout.CopyFrom(layout)
        new_layout.input[0] = moved_out
        new_layout.output[0] = node.output[0]
        g.replace_node(lidx, [new_op])
        g.replace_node(idx, [new_layout])
        ranks[moved_out] = in_rank
        moved += 1
    return moved


def matmul_to_gemm(g: Graph, info: ValueInfo) -> int:
    """Turn a 2-D MatMul (+ per-column bias Add) that a constant Mul/Add reads into Gemm."""
    made = 0
    for idx, node in list(g.live_nodes()):
        if idx in g.removed or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        weight = g.constant(node.input[1])
        if weight is None or weight.ndim != 2 or np.dtype(weight.dtype) not in FOLDABLE_DTYPES:
            continue
        if info.rank(node.input[0]) != 2:
            continue
        reader = g.sole_reader(node.output[0])
        if reader is None:
            continue
        bias_add: int | None = None
        bias_name = ""
        end = node.output[0]
        rnode = g.node(reader)
        if rnode.op_type == "Add":
            found = _const_operand(g, rnode)
            if found is not None:
                pos, bias = found
                if bias.ndim <= 2 and bias.size == weight.shape[1] and (bias.ndim < 2 or bias.shape[0] == 1):
                    bias_add, bias_name, end = reader, rnode.input[1 - pos], rnode.output[0]
                    if bias.ndim != 1:
                        bias_name = g.add_initializer(f"{rnode.name or end}_bias", bias.reshape(-1))
        after = g.sole_reader(end)
        if after is None:
            continue
        anode = g.node(after)
        if anode.op_type not in ("Mul", "Add") or _const_operand(g, anode) is None:
            continue
        inputs = [node.input[0], node.input[1]] + ([bias_name] if bias_name else [])
        gemm = helper.make_node("Gemm", inputs, [end], name=node.name or None)
        g.replace_node(idx, [gemm])
        if bias_add is not None:
            g.replace_node(bias_add, [])
        made += 1
    return made
