"""One rule per producer that can absorb a per-channel affine map ``y = s·x + t``, and how a map finds one.

The map is a test-mode BatchNormalization, or a per-channel Mul(constant) then Add(constant) chain (the
decomposed ``tf.nn.batch_normalization`` that TensorFlow exports produce). ``match`` returns a fold (a
:class:`~converter.affine.Fold`) or a :class:`Skip` with the reason, never raises for a pattern it declines; the
fold's ``apply`` rewrites the graph.
Each fold says how it was found (:class:`FoldKind`):

  * backward: into the node producing the map's input (Conv, ConvTranspose, Gemm, MatMul [+ bias Add]);
  * through shape op: the same, across Squeeze/Unsqueeze/Reshape/Flatten/Identity nodes between producer and map
    when the static shapes prove that every element keeps its channel (:meth:`ValueInfo.channel_layout`);
  * concat split: the map reads a channel-axis Concat; it is split by channel ranges into the Concat's producers,
    each of which must be able to absorb its part;
  * forward: into the linear layer that is the map's only reader (:mod:`converter.forward`), tried only when no
    backward fold exists.

A backward fold is legal only when
  * the producer's output feeds the map alone (one reader, not a graph output, not read by a subgraph);
  * the producer's weight and bias are constants (initializer, Constant node, or a constant expression of
    :mod:`converter.consteval`); a weight shared with another node is cloned, so the other reader keeps the original;
  * the weight is float16, float32 or float64;
  * for MatMul, BN's channel axis (1) is the MatMul output's last axis: a 2-D output and a 2-D weight.
The folded weight and bias are written as precomputed constants, computed in float64 and cast once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from onnx import NodeProto

from converter import folding, forward
from converter.affine import Affine, Fold, FoldKind, Skip, add_after, fold_gemm_node, folded_name, gemm_before_opset_7
from converter.folding import F64, FOLDABLE_DTYPES
from converter.graph import Graph, attribute, display_name, int_attribute
from converter.shapes import Cast, ValueInfo

__all__ = [
    "CHAIN_PRODUCERS",
    "DEFAULT_RULES",
    "SHAPE_OPS",
    "Affine",
    "Fold",
    "FoldKind",
    "Match",
    "Rule",
    "Skip",
    "Split",
    "chain_after",
    "match",
    "match_backward",
    "splice",
]

Weight = NDArray[Any]

#: Nodes between a producer and the map that a backward fold may look through (when the shapes prove it).
SHAPE_OPS = ("Squeeze", "Unsqueeze", "Reshape", "Flatten", "Identity")


@dataclass
class Match:
    """A backward fold of ``affine`` into ``producer`` (or one part of a Concat split)."""

    rule: Rule
    producer: int
    affine: Affine
    weight: Weight
    bias: Weight | None
    channels: int
    extra: dict[str, int] = field(default_factory=dict)  # rule-specific node ids (MatMul's bias Add)
    via: tuple[int, ...] = ()  # shape ops between the producer and the map, in data order
    kind: FoldKind = FoldKind.BACKWARD
    into: str = ""

    @property
    def s(self) -> F64:
        return np.broadcast_to(self.affine.s, (self.channels,))

    @property
    def t(self) -> F64:
        return np.broadcast_to(self.affine.t, (self.channels,))

    def apply(self, g: Graph, cast: Cast) -> None:
        self.rule.apply(g, self, cast)


class Rule:
    """Base: the checks every producer shares, then :meth:`check` for the producer's own layout."""

    producers: ClassVar[tuple[str, ...]]
    bias_input: ClassVar[int] = 2
    channel_axis: ClassVar[int] = 1  # where the output channel sits in the producer's output

    def match(
        self,
        g: Graph,
        producer: int,
        affine: Affine,
        info: ValueInfo,
        *,
        reads: str | None = None,
        reader: int | None = None,
        via: tuple[int, ...] = (),
        kind: FoldKind = FoldKind.BACKWARD,
    ) -> Match | Skip:
        """``reader`` (default: the map) reads the producer's output ``reads`` (default: the map's input)."""
        reads = affine.input if reads is None else reads
        reader = affine.nodes[0] if reader is None else reader
        node = g.node(producer)
        what = f"{node.op_type} {display_name(node)}"
        if node.output[0] != reads:
            return Skip(f"{what} writes it as a secondary output")
        if not g.sole_user(reads, reader):
            return Skip(f"the output of {what} has other readers or is a graph output")
        located = self.locate(g, producer)
        if isinstance(located, Skip):
            return located
        core, bias, extra = located
        core_node = g.node(core)
        what = f"{core_node.op_type} {display_name(core_node)}"
        weight = g.constant(core_node.input[1]) if len(core_node.input) > 1 else None
        if weight is None:
            why = g.why_not_constant(core_node.input[1]) if len(core_node.input) > 1 else "it has none"
            return Skip(f"the weight of {what} is not a constant ({why})")
        if np.dtype(weight.dtype) not in FOLDABLE_DTYPES:
            return Skip(f"the weight of {what} is {weight.dtype}, not a foldable float type")
        channels = self.check(g, core_node, weight, info, bool(via))
        if isinstance(channels, Skip):
            return channels
        if bias is not None:
            refused = self.check_bias(bias, channels, what)
            if refused is not None:
                return refused
        if affine.s.size not in (1, channels) or affine.t.size not in (1, channels):
            return Skip(f"{what} has {channels} output channels, the map has {max(affine.s.size, affine.t.size)}")
        into = what + "".join(f" through {g.node(i).op_type} {display_name(g.node(i))}" for i in via)
        return Match(self, core, affine, weight, bias, channels, extra, via, kind, into)

    def locate(self, g: Graph, producer: int) -> tuple[int, Weight | None, dict[str, int]] | Skip:
        """The node holding the weight, the bias value (None without one) and rule-specific node ids."""
        node = g.node(producer)
        if len(node.input) > self.bias_input and node.input[self.bias_input]:
            bias = g.constant(node.input[self.bias_input])
            if bias is None:
                why = g.why_not_constant(node.input[self.bias_input])
                return Skip(f"the bias of {node.op_type} {display_name(node)} is not a constant ({why})")
            return producer, bias, {}
        return producer, None, {}

    def check(self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, via: bool) -> int | Skip:
        """The producer's output channel count, or why its layout does not fit."""
        raise NotImplementedError

    def check_bias(self, bias: Weight, channels: int, what: str) -> Skip | None:
        return None

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        """The new weight and bias, in float64; drops the node's attributes they absorb (Gemm's alpha and beta)."""
        raise NotImplementedError

    def fold_constants(self, g: Graph, m: Match, cast: Cast) -> int:
        """Write the folded weight and bias; return the node that now writes the value the reader reads."""
        node = g.node(m.producer)
        name = display_name(node)
        w2, b2 = self.fold(node, m)
        g.write_constant(m.producer, 1, cast(w2, m.weight.dtype, name), folded_name(node, "weight"))
        g.write_constant(m.producer, self.bias_input, cast(b2, m.weight.dtype, name), folded_name(node, "bias"))
        return m.producer

    def apply(self, g: Graph, m: Match, cast: Cast) -> None:
        tail = self.fold_constants(g, m, cast)
        splice(g, m.via[-1] if m.via else tail, m.affine)


class ConvFold(Rule):
    producers = ("Conv",)

    def check(self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, via: bool) -> int | Skip:
        if weight.ndim < 3:
            return Skip(f"Conv {display_name(node)} has a weight of rank {weight.ndim}")
        return int(weight.shape[0])

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        return folding.fold_conv(m.weight, m.bias, m.s, m.t)


class ConvTransposeFold(Rule):
    producers = ("ConvTranspose",)

    def check(self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, via: bool) -> int | Skip:
        group = int_attribute(node, "group", 1)
        if weight.ndim < 3 or group < 1 or weight.shape[0] % group:
            return Skip(
                f"ConvTranspose {display_name(node)} has a weight {weight.shape} that does not fit group={group}"
            )
        return int(weight.shape[1]) * group

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        group = int_attribute(node, "group", 1)
        return folding.fold_conv_transpose(m.weight, m.bias, m.s, m.t, group)


class GemmFold(Rule):
    producers = ("Gemm",)

    def check(self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, via: bool) -> int | Skip:
        refused = gemm_before_opset_7(g)
        if refused is not None:
            return refused
        if weight.ndim != 2:
            return Skip(f"Gemm {display_name(node)} has a B of rank {weight.ndim}")
        return int(weight.shape[0] if attribute(node, "transB", 0) else weight.shape[1])

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        return fold_gemm_node(node, folding.fold_gemm, m.weight, m.bias, m.s, m.t)


class MatMulFold(Rule):
    """MatMul with a constant 2-D weight and a 2-D output, optionally followed by Add of a constant bias."""

    producers = ("MatMul", "Add")
    channel_axis = -1

    def locate(self, g: Graph, producer: int) -> tuple[int, Weight | None, dict[str, int]] | Skip:
        node = g.node(producer)
        if node.op_type != "Add":
            return producer, None, {}
        for mm_pos, bias_pos in ((0, 1), (1, 0)):
            mm = g.producer(node.input[mm_pos])
            bias = g.constant(node.input[bias_pos])
            if mm is not None and g.node(mm).op_type == "MatMul" and bias is not None:
                if np.dtype(bias.dtype) not in FOLDABLE_DTYPES:
                    return Skip(f"the bias of Add {display_name(node)} is {bias.dtype}")
                if not g.sole_user(g.node(mm).output[0], producer):
                    shown = display_name(g.node(mm))
                    return Skip(f"the output of MatMul {shown} has other readers or is a graph output")
                return mm, bias, {"add": producer}
        return Skip(f"its input comes from Add {display_name(node)}, not a MatMul plus a constant bias")

    def check(self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, via: bool) -> int | Skip:
        what = f"MatMul {display_name(node)}"
        rank = info.rank(node.input[0])
        if weight.ndim != 2 or (rank != 2 and not via):
            shown = "unknown" if rank is None else str(rank)
            return Skip(
                f"the channel axis 1 is the last axis of the {what} output only for a 2-D input and weight "
                f"(input rank {shown}, weight rank {weight.ndim})"
            )
        return int(weight.shape[1])

    def check_bias(self, bias: Weight, channels: int, what: str) -> Skip | None:
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, channels)):
            return Skip(f"the bias added to {what} has shape {bias.shape}, not per output column")
        return None

    def fold(self, node: NodeProto, m: Match) -> tuple[F64, F64]:
        return folding.fold_matmul(m.weight, m.bias, m.s, m.t)

    def fold_constants(self, g: Graph, m: Match, cast: Cast) -> int:
        mm = g.node(m.producer)
        name = display_name(mm)
        w2, b2 = self.fold(mm, m)
        g.write_constant(m.producer, 1, cast(w2, m.weight.dtype, name), folded_name(mm, "weight"))
        bias = cast(b2, m.weight.dtype, name)
        if "add" in m.extra:
            add = g.node(m.extra["add"])
            position = 0 if g.producer(add.input[1]) == m.producer else 1
            g.write_constant(m.extra["add"], position, bias, folded_name(mm, "bias"))
            return m.extra["add"]
        return add_after(g, m.producer, bias, folded_name(mm, "bias"))


DEFAULT_RULES: tuple[Rule, ...] = (ConvFold(), ConvTransposeFold(), GemmFold(), MatMulFold())

#: Producers after which a Mul/Add chain is folded (their channel axis is 1, like BatchNormalization's).
CHAIN_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


@dataclass
class Split:
    """A map after a channel-axis Concat, split by channel ranges into one backward fold per Concat input."""

    concat: int
    affine: Affine
    parts: list[Match]
    into: str
    kind: FoldKind = FoldKind.CONCAT_SPLIT

    @property
    def producer(self) -> int:
        return self.concat

    @property
    def weight(self) -> None:
        """None: a split rewrites one weight per part, so its readiness figures are not one layer's."""
        return None

    def apply(self, g: Graph, cast: Cast) -> None:
        for part in self.parts:
            part.rule.fold_constants(g, part, cast)
        splice(g, self.concat, self.affine)


def match(g: Graph, affine: Affine, info: ValueInfo, rules: tuple[Rule, ...] = DEFAULT_RULES) -> Fold | Skip:
    """The fold of ``affine``: backward (directly, through shape ops, split over a Concat), else forward."""
    backward = match_backward(g, affine, info, rules)
    if not isinstance(backward, Skip):
        return backward
    ahead = forward.match(g, affine, info)
    if ahead is None:
        return backward
    if isinstance(ahead, Skip):
        return Skip(f"{backward.reason}; {ahead.reason}")
    return ahead


def match_backward(
    g: Graph, affine: Affine, info: ValueInfo, rules: tuple[Rule, ...] = DEFAULT_RULES
) -> Match | Split | Skip:
    """The fold of ``affine`` into the node(s) producing its input, or why there is none."""
    producer = g.producer(affine.input)
    if producer is None:
        if g.outer is not None and affine.input not in g.inputs:  # an If/Loop body reading the enclosing graph
            return Skip("its input comes from the graph enclosing its If/Loop/Scan body; folds stay inside a body")
        return Skip("its input is a graph input, not produced by a node")
    node = g.node(producer)
    if node.domain not in ("", "ai.onnx"):
        return Skip(f"its input comes from {node.domain}.{node.op_type} {display_name(node)}")
    if node.op_type in SHAPE_OPS:
        return _through_shape_ops(g, producer, affine, info, rules)
    if node.op_type == "Concat":
        return _split_concat(g, producer, affine, info, rules)
    rule = _rule_for(node, rules)
    if rule is None:
        return Skip(
            f"its input comes from {node.op_type} {display_name(node)}; "
            "only Conv, ConvTranspose, Gemm and MatMul (+ bias) can absorb it"
        )
    return rule.match(g, producer, affine, info)


def _rule_for(node: NodeProto, rules: tuple[Rule, ...]) -> Rule | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    return next((rule for rule in rules if node.op_type in rule.producers), None)


def _through_shape_ops(g: Graph, first: int, affine: Affine, info: ValueInfo, rules: tuple[Rule, ...]) -> Match | Skip:
    """Walk back over shape ops to a producer, and prove with static shapes that channels map one to one."""
    chain: list[int] = []
    name, reader, idx = affine.input, affine.nodes[0], first
    while True:
        node = g.node(idx)
        what = f"{node.op_type} {display_name(node)}"
        if node.output[0] != name or not g.sole_user(name, reader):
            return Skip(f"the output of {what} has other readers or is a graph output")
        chain.append(idx)
        name, reader = node.input[0], idx
        producer = g.producer(name)
        if producer is None:
            return Skip(f"its input comes from {what}, which reads a graph input")
        idx = producer
        if g.node(idx).op_type not in SHAPE_OPS or g.node(idx).domain not in ("", "ai.onnx"):
            break
    ops = " → ".join(f"{g.node(i).op_type} {display_name(g.node(i))}" for i in reversed(chain))
    node = g.node(idx)
    rule = _rule_for(node, rules)
    if rule is None:
        return Skip(
            f"its input comes from {ops} after {node.op_type} {display_name(node)}; "
            "only Conv, ConvTranspose, Gemm and MatMul (+ bias) can absorb it"
        )
    mine = info.channel_layout(name, rule.channel_axis)
    theirs = info.channel_layout(affine.input, 1)
    if mine is None or theirs is None:
        if rule.channel_axis != 1 or not all(_keeps_axes_0_and_1(g, i, info) for i in chain):
            return Skip(
                f"its input comes through {ops}; the static shapes needed to prove it keeps channels are unknown"
            )
    elif mine != theirs:
        return Skip(
            f"{ops} does not keep the channel axis: {mine[0]} channels × {mine[1]} inner elements in, "
            f"{theirs[0]} × {theirs[1]} at the map"
        )
    via = tuple(reversed(chain))
    return rule.match(g, idx, affine, info, reads=name, reader=via[0], via=via, kind=FoldKind.THROUGH_SHAPE)


def _keeps_axes_0_and_1(g: Graph, idx: int, info: ValueInfo) -> bool:
    """True for Identity, and for Squeeze/Unsqueeze of constant axes all after axis 1: they only remove or insert
    size-1 dims behind the channel axis, so every element keeps its channel whatever the (symbolic) sizes."""
    node = g.node(idx)
    if node.op_type == "Identity":
        return True
    if node.op_type not in ("Squeeze", "Unsqueeze"):
        return False
    if g.opset < 13:
        value = attribute(node, "axes")
        axes = [int(a) for a in value] if isinstance(value, list) else None
    else:
        const = g.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        axes = None if const is None else [int(a) for a in np.asarray(const).reshape(-1)]
    rank = info.rank(node.output[0] if node.op_type == "Unsqueeze" else node.input[0])
    if not axes or rank is None:
        return False
    return all((a + rank if a < 0 else a) >= 2 for a in axes)


def _split_concat(g: Graph, idx: int, affine: Affine, info: ValueInfo, rules: tuple[Rule, ...]) -> Split | Skip:
    node = g.node(idx)
    what = f"Concat {display_name(node)}"
    rank = info.rank(node.output[0])
    axis = int_attribute(node, "axis", 0)
    if axis < 0:
        if rank is None:
            return Skip(f"its input comes from {what} on axis {axis} of a tensor of unknown rank")
        axis += rank
    if axis != 1:
        return Skip(f"its input comes from {what} on axis {axis}, not the channel axis 1")
    if node.output[0] != affine.input or not g.sole_user(affine.input, affine.nodes[0]):
        return Skip(f"the output of {what} has other readers or is a graph output")
    if len(set(node.input)) != len(node.input) or not all(node.input):
        return Skip(f"{what} reads one value twice")
    probe = replace(affine, s=np.ones(1), t=np.zeros(1))
    parts: list[Match] = []
    for position, name in enumerate(node.input):
        producer = g.producer(name)
        if producer is None:
            return Skip(f"input {position} of {what} is a graph input, which cannot absorb its part")
        rule = _rule_for(g.node(producer), rules)
        if rule is None:
            p = g.node(producer)
            shown = f"{p.op_type} {display_name(p)}"
            return Skip(f"input {position} of {what} comes from {shown}, which cannot absorb its part")
        found = rule.match(g, producer, probe, info, reads=name, reader=idx, kind=FoldKind.CONCAT_SPLIT)
        if isinstance(found, Skip):
            return Skip(f"input {position} of {what}: {found.reason}")
        known = info.shape(name)
        if known is not None and len(known) > 1 and known[1] not in (None, found.channels):
            return Skip(f"input {position} of {what} has {known[1]} channels, its producer {found.channels}")
        parts.append(found)
    total = sum(p.channels for p in parts)
    size = max(affine.s.size, affine.t.size)
    if size not in (1, total):
        return Skip(f"the inputs of {what} have {total} channels, the map has {size}")
    s, t = np.broadcast_to(affine.s, (total,)), np.broadcast_to(affine.t, (total,))
    start = 0
    for i, part in enumerate(parts):
        stop = start + part.channels
        parts[i] = replace(part, affine=replace(affine, s=s[start:stop].copy(), t=t[start:stop].copy()))
        start = stop
    into = f"{' + '.join(p.into for p in parts)} (split at {what})"
    return Split(idx, affine, parts, into)


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
    first = g.sole_reader(out, once=True)
    if first is None:
        return None
    first_node = g.node(first)
    if first_node.op_type == "Mul":
        s = _channel_operand(g, first_node, out, rank)
        if s is None:
            return None
        nodes, end = [first], first_node.output[0]
        t: F64 = np.zeros(1)
        second = g.sole_reader(end, once=True)
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
