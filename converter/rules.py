"""One rule per producer that can absorb a per-channel affine map ``y = s·x + t``.

The map is a test-mode BatchNormalization, or a per-channel Mul(constant) then Add(constant) chain (the
decomposed ``tf.nn.batch_normalization`` that TensorFlow exports produce). ``match`` returns a :class:`Match`
or a :class:`Skip` with the reason, never raises for a pattern it declines; ``apply`` rewrites the graph.

A fold is legal only when
  * the producer's output feeds the map alone (one reader, not a graph output, not read by a subgraph);
  * the producer's weight and bias are constants (initializer, Constant node, or through Identity); a weight
    shared with another node is cloned, so the other reader keeps the original;
  * the weight is float16, float32 or float64;
  * for MatMul, BN's channel axis (1) is the MatMul output's last axis: a 2-D output and a 2-D weight.
The folded weight and bias are written as precomputed constants, computed in float64 and cast once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from onnx import NodeProto, helper

from converter import folding
from converter.folding import F64, FOLDABLE_DTYPES
from converter.graph import SUBGRAPH, Graph, attribute, display_name
from converter.shapes import Cast, ValueInfo

Weight = NDArray[Any]


@dataclass(frozen=True)
class Affine:
    """A per-channel map ``y = s·x + t`` reading ``input`` and writing ``output``, made of ``nodes``."""

    nodes: tuple[int, ...]
    input: str
    output: str
    s: F64
    t: F64
    label: str


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass
class Match:
    rule: Rule
    producer: int
    affine: Affine
    weight: Weight
    bias: Weight | None
    channels: int
    extra: dict[str, int] = field(default_factory=dict)  # rule-specific node ids (MatMul's bias Add)

    @property
    def s(self) -> F64:
        return np.broadcast_to(self.affine.s, (self.channels,))

    @property
    def t(self) -> F64:
        return np.broadcast_to(self.affine.t, (self.channels,))


class Rule:
    """Base: the checks every producer shares, then :meth:`check` for the producer's own layout."""

    producers: ClassVar[tuple[str, ...]]
    bias_input: ClassVar[int] = 2

    def match(self, g: Graph, producer: int, affine: Affine, info: ValueInfo) -> Match | Skip:
        node = g.node(producer)
        what = f"{node.op_type} {display_name(node)}"
        if node.output[0] != affine.input:
            return Skip(f"{what} writes it as a secondary output")
        if not g.sole_user(affine.input, affine.nodes[0]):
            return Skip(f"the output of {what} has other readers or is a graph output")
        weight = g.constant(node.input[1]) if len(node.input) > 1 else None
        if weight is None:
            return Skip(f"the weight of {what} is not a constant")
        if np.dtype(weight.dtype) not in FOLDABLE_DTYPES:
            return Skip(f"the weight of {what} is {weight.dtype}, not a foldable float type")
        bias = None
        if len(node.input) > self.bias_input and node.input[self.bias_input]:
            bias = g.constant(node.input[self.bias_input])
            if bias is None:
                return Skip(f"the bias of {what} is not a constant")
        channels = self.check(g, node, weight)
        if isinstance(channels, Skip):
            return channels
        if affine.s.size not in (1, channels) or affine.t.size not in (1, channels):
            return Skip(f"{what} has {channels} output channels, the map has {max(affine.s.size, affine.t.size)}")
        return Match(self, producer, affine, weight, bias, channels)

    def check(self, g: Graph, node: NodeProto, weight: Weight) -> int | Skip:
        """The producer's output channel count, or why its layout does not fit."""
        raise NotImplementedError

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        raise NotImplementedError

    def apply(self, g: Graph, m: Match, cast: Cast) -> None:
        node = g.node(m.producer)
        name = display_name(node)
        w2, b2 = self.fold(node, m)
        g.write_constant(m.producer, 1, cast(w2, m.weight.dtype, name), _base(node, "weight"))
        g.write_constant(m.producer, self.bias_input, cast(b2, m.weight.dtype, name), _base(node, "bias"))
        self.finish(g, m)
        splice(g, m.producer, m.affine)

    def finish(self, g: Graph, m: Match) -> None:
        """Adjust the producer's attributes after its constants changed."""


class ConvFold(Rule):
    producers = ("Conv",)

    def check(self, g: Graph, node: NodeProto, weight: Weight) -> int | Skip:
        if weight.ndim < 3:
            return Skip(f"Conv {display_name(node)} has a weight of rank {weight.ndim}")
        return int(weight.shape[0])

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        return folding.fold_conv(m.weight, m.bias, m.s, m.t)


class ConvTransposeFold(Rule):
    producers = ("ConvTranspose",)

    def check(self, g: Graph, node: NodeProto, weight: Weight) -> int | Skip:
        group = _int_attr(node, "group", 1)
        if weight.ndim < 3 or group < 1 or weight.shape[0] % group:
            return Skip(
                f"ConvTranspose {display_name(node)} has a weight {weight.shape} that does not fit group={group}"
            )
        return int(weight.shape[1]) * group

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        group = _int_attr(node, "group", 1)
        return folding.fold_conv_transpose(m.weight, m.bias, m.s, m.t, group)


class GemmFold(Rule):
    producers = ("Gemm",)

    def check(self, g: Graph, node: NodeProto, weight: Weight) -> int | Skip:
        if g.opset < 7:
            return Skip("Gemm before opset 7 (legacy broadcast attribute)")
        if weight.ndim != 2:
            return Skip(f"Gemm {display_name(node)} has a B of rank {weight.ndim}")
        return int(weight.shape[0] if attribute(node, "transB", 0) else weight.shape[1])

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        alpha = float(attribute(node, "alpha", 1.0))  # type: ignore[arg-type]
        beta = float(attribute(node, "beta", 1.0))  # type: ignore[arg-type]
        trans_b = bool(attribute(node, "transB", 0))
        return folding.fold_gemm(m.weight, m.bias, m.s, m.t, alpha, beta, trans_b)

    def finish(self, g: Graph, m: Match) -> None:
        node = g.node(m.producer)
        keep = [a for a in node.attribute if a.name not in ("alpha", "beta")]
        del node.attribute[:]
        node.attribute.extend(keep)


class MatMulFold(Rule):
    """MatMul with a constant 2-D weight and a 2-D output, optionally followed by Add of a constant bias."""

    producers = ("MatMul", "Add")

    def match(self, g: Graph, producer: int, affine: Affine, info: ValueInfo) -> Match | Skip:
        node = g.node(producer)
        add: int | None = None
        bias: Weight | None = None
        if node.op_type == "Add":
            found = self._bias_add(g, producer)
            if isinstance(found, Skip):
                return found
            add, producer, bias = producer, *found
            if not g.sole_user(affine.input, affine.nodes[0]) or node.output[0] != affine.input:
                return Skip(f"the output of Add {display_name(node)} has other readers or is a graph output")
            reader = add
        else:
            reader = affine.nodes[0]
        mm = g.node(producer)
        what = f"MatMul {display_name(mm)}"
        if not g.sole_user(mm.output[0], reader):
            return Skip(f"the output of {what} has other readers or is a graph output")
        weight = g.constant(mm.input[1])
        if weight is None:
            return Skip(f"the weight of {what} is not a constant")
        if np.dtype(weight.dtype) not in FOLDABLE_DTYPES:
            return Skip(f"the weight of {what} is {weight.dtype}, not a foldable float type")
        rank = info.rank(mm.input[0])
        if weight.ndim != 2 or rank != 2:
            shown = "unknown" if rank is None else str(rank)
            return Skip(
                f"the channel axis 1 is the last axis of the {what} output only for a 2-D input and weight "
                f"(input rank {shown}, weight rank {weight.ndim})"
            )
        channels = int(weight.shape[1])
        if bias is not None and (bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels))):
            return Skip(f"the bias added to {what} has shape {bias.shape}, not per output column")
        if affine.s.size not in (1, channels) or affine.t.size not in (1, channels):
            return Skip(f"{what} has {channels} output columns, the map has {affine.s.size}")
        extra = {} if add is None else {"add": add}
        return Match(self, producer, affine, weight, bias, channels, extra)

    @staticmethod
    def _bias_add(g: Graph, add: int) -> tuple[int, Weight] | Skip:
        node = g.node(add)
        for mm_pos, bias_pos in ((0, 1), (1, 0)):
            mm = g.producer(node.input[mm_pos])
            bias = g.constant(node.input[bias_pos])
            if mm is not None and g.node(mm).op_type == "MatMul" and bias is not None:
                if np.dtype(bias.dtype) not in FOLDABLE_DTYPES:
                    return Skip(f"the bias of Add {display_name(node)} is {bias.dtype}")
                return mm, bias
        return Skip(f"its input comes from Add {display_name(node)}, not a MatMul plus a constant bias")

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        return folding.fold_matmul(m.weight, m.bias, m.s, m.t)

    def apply(self, g: Graph, m: Match, cast: Cast) -> None:
        mm = g.node(m.producer)
        name = display_name(mm)
        w2, b2 = self.fold(mm, m)
        g.write_constant(m.producer, 1, cast(w2, m.weight.dtype, name), _base(mm, "weight"))
        bias = cast(b2, m.weight.dtype, name)
        if "add" in m.extra:
            add = g.node(m.extra["add"])
            position = 0 if g.producer(add.input[1]) == m.producer else 1
            g.write_constant(m.extra["add"], position, bias, _base(mm, "bias"))
            splice(g, m.extra["add"], m.affine)
            return
        bias_name = g.add_initializer(_base(mm, "bias"), bias)
        add = helper.make_node(
            "Add", [mm.output[0], bias_name], [m.affine.output], name=g.unique_name(f"{_base(mm, 'bias')}_add")
        )
        first, *rest = m.affine.nodes
        g.replace_node(first, [add])
        for idx in rest:
            g.replace_node(idx, [])


DEFAULT_RULES: tuple[Rule, ...] = (ConvFold(), ConvTransposeFold(), GemmFold(), MatMulFold())

#: Producers after which a Mul/Add chain is folded (their channel axis is 1, like BatchNormalization's).
CHAIN_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


def match(g: Graph, affine: Affine, info: ValueInfo, rules: tuple[Rule, ...] = DEFAULT_RULES) -> Match | Skip:
    """The fold of ``affine`` into the node producing its input, or why there is none."""
    producer = g.producer(affine.input)
    if producer is None:
        return Skip("its input is a graph input, not produced by a node")
    node = g.node(producer)
    if node.domain not in ("", "ai.onnx"):
        return Skip(f"its input comes from {node.domain}.{node.op_type} {display_name(node)}")
    for rule in rules:
        if node.op_type in rule.producers:
            return rule.match(g, producer, affine, info)
    return Skip(
        f"its input comes from {node.op_type} {display_name(node)}; "
        "only Conv, ConvTranspose, Gemm and MatMul (+ bias) can absorb it"
    )


def splice(g: Graph, producer: int, affine: Affine) -> None:
    """Drop the map's nodes; the producer writes the map's output name from now on."""
    for idx in affine.nodes:
        g.replace_node(idx, [])
    g.rename_output(producer, 0, affine.output)


def chain_after(g: Graph, producer: int) -> Affine | None:
    """A per-channel Mul(constant) [then Add(constant)], or Add(constant), reading ``producer``'s output."""
    node = g.node(producer)
    if node.op_type not in CHAIN_PRODUCERS or node.domain not in ("", "ai.onnx"):
        return None
    weight = g.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return None
    rank = 2 if node.op_type == "Gemm" else weight.ndim
    out = node.output[0]
    first = _sole_reader(g, out)
    if first is None:
        return None
    first_node = g.node(first)
    if first_node.op_type == "Mul":
        s = _channel_operand(g, first_node, out, rank)
        if s is None:
            return None
        nodes, end = [first], first_node.output[0]
        t: F64 = np.zeros(1)
        second = _sole_reader(g, end)
        if second is not None and g.node(second).op_type == "Add":
            shift = _channel_operand(g, g.node(second), end, rank)
            if shift is not None:
                nodes, t, end = [first, second], shift, g.node(second).output[0]
        label = "+".join(g.node(i).op_type for i in nodes)
        return Affine(tuple(nodes), out, end, s, t, f"{label} {display_name(first_node)}")
    if first_node.op_type == "Add":
        shift = _channel_operand(g, first_node, out, rank)
        if shift is None:
            return None
        return Affine((first,), out, first_node.output[0], np.ones(1), shift, f"Add {display_name(first_node)}")
    return None


def _sole_reader(g: Graph, name: str) -> int | None:
    users = set(g.users(name))
    if name in g.outputs or len(users) != 1 or SUBGRAPH in users:
        return None
    idx = users.pop()
    node = g.node(idx)
    if node.domain not in ("", "ai.onnx") or list(node.input).count(name) != 1:
        return None
    return idx


def _channel_operand(g: Graph, node: NodeProto, x: str, rank: int) -> F64 | None:
    """The other operand of a binary node as a per-channel vector (axis 1 of a rank-``rank`` x), or None."""
    if len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == x else node.input[0]
    value = g.constant(other)
    if value is None or np.dtype(value.dtype) not in FOLDABLE_DTYPES or value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for axis, d in enumerate(shape) if axis != 1):
        return None
    return np.asarray(value, dtype=np.float64).reshape(-1)


def _base(node: NodeProto, role: str) -> str:
    stem = node.name or node.output[0]
    return f"{stem}_{role}_folded".replace("/", "_")


def _int_attr(node: NodeProto, name: str, default: int) -> int:
    value = attribute(node, name, default)
    return int(value) if isinstance(value, int) else default
