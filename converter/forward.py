"""Forward folding: a map whose only reader is a linear layer ``L`` becomes part of ``L``: ``L(s·x + t)``.

Per input channel of ``L`` the scale goes into its weight and the shift, pushed through the weight, into its bias
(:mod:`converter.folding` has the formulas). Legal only when
  * the map's output is read by ``L`` alone (not a graph output), optionally through one ``Flatten``/``Reshape``
    that the static shapes prove to turn ``(N, C, rest…)`` into ``(N, C·R)`` with ``R = prod(rest)`` — then a
    per-channel scale is a per-feature scale repeated ``R`` times;
  * the map's output is ``L``'s data input: Conv/ConvTranspose input 0, Gemm A with ``transA=0``, MatMul's left
    operand of rank 2 (only then is BN's channel axis 1 the contracted axis);
  * Conv has no zero padding (all pads 0, no ``SAME`` auto-pad): a padded border would see ``0``, not ``t``;
  * ConvTranspose has a 1×1 kernel, stride 1 and no padding: otherwise output positions receive different numbers
    of taps and the shift does not add up to the same bias everywhere;
  * ``L``'s weight (and bias) are constants of a float type; a shared weight is cloned by the write.
Backward folding is tried first; this module is asked only when there is none. One :class:`ForwardRule` per
linear layer holds that layer's own checks and arithmetic, as :mod:`converter.rules` has one rule per producer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray
from onnx import NodeProto

from converter import folding
from converter.affine import Affine, FoldKind, Skip, add_after, fold_gemm_node, folded_name, gemm_before_opset_7
from converter.folding import F64, FOLDABLE_DTYPES
from converter.graph import SUBGRAPH, Graph, attribute, display_name, int_attribute, ints_attribute
from converter.shapes import Cast, ValueInfo

FLATTENERS = ("Flatten", "Reshape")

Weight = NDArray[Any]


@dataclass
class Forward:
    """A forward fold of ``affine`` into node ``layer`` (reached through ``flatten`` when not None)."""

    rule: ForwardRule
    affine: Affine
    layer: int
    flatten: int | None
    weight: Weight
    bias: Weight | None
    s: F64  # per input feature of the layer (a channel's value repeated over the flattened spatial size)
    t: F64
    into: str
    kind: FoldKind = FoldKind.FORWARD

    @property
    def producer(self) -> int:
        return self.layer

    def apply(self, g: Graph, cast: Cast) -> None:
        node = g.node(self.layer)
        name = display_name(node)
        dtype = self.weight.dtype
        w2, b2 = self.rule.fold(node, self)
        g.write_constant(self.layer, 1, cast(w2, dtype, name), folded_name(node, "weight"))
        g.set_input(self.layer if self.flatten is None else self.flatten, 0, self.affine.input)
        for idx in self.affine.nodes:
            g.replace_node(idx, [])
        self.rule.write_bias(g, self.layer, cast(b2, dtype, name))


class ForwardRule:
    """Base: one linear layer that can absorb a map on its data input; the checks every layer shares live in
    :func:`match`, :meth:`features` holds the layer's own."""

    consumers: ClassVar[tuple[str, ...]]
    through_flatten: ClassVar[bool] = False  # may read the map through one Flatten/Reshape

    def bias(self, g: Graph, layer: int) -> Weight | Skip | None:
        """The layer's constant bias (input 2), None without one."""
        node = g.node(layer)
        if len(node.input) > 2 and node.input[2]:
            bias = g.constant(node.input[2])
            return Skip(f"its bias is not a constant ({g.why_not_constant(node.input[2])})") if bias is None else bias
        return None

    def features(
        self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, reads: str, flattened: bool
    ) -> int | Skip:
        """How many input channels/features the layer contracts the map's output over, or why it cannot absorb it."""
        raise NotImplementedError

    def fold(self, node: NodeProto, f: Forward) -> tuple[F64, F64]:
        """The new weight and bias, in float64 (:mod:`converter.folding`)."""
        raise NotImplementedError

    def write_bias(self, g: Graph, layer: int, bias: Weight) -> None:
        node = g.node(layer)
        g.write_constant(layer, 2, bias, folded_name(node, "bias"))


class _ConvLike(ForwardRule):
    """Conv and ConvTranspose: a grouped weight of rank ≥ 3, exact only without zero padding."""

    def features(
        self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, reads: str, flattened: bool
    ) -> int | Skip:
        group = int_attribute(node, "group", 1)
        if weight.ndim < 3 or group < 1:
            return Skip(f"weight of rank {weight.ndim}")
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        pads = ints_attribute(node, "pads")
        if auto not in ("NOTSET", "VALID") or any(pads):
            shown = f"auto_pad {auto}" if auto not in ("NOTSET", "VALID") else f"pads {pads}"
            return Skip(f"it pads with zeros ({shown}); the padded border would see 0 instead of the shift t")
        return self.channels(node, weight, group)

    def channels(self, node: NodeProto, weight: Weight, group: int) -> int | Skip:
        raise NotImplementedError


class ConvForward(_ConvLike):
    consumers = ("Conv",)

    def channels(self, node: NodeProto, weight: Weight, group: int) -> int | Skip:
        return int(weight.shape[1]) * group

    def fold(self, node: NodeProto, f: Forward) -> tuple[F64, F64]:
        return folding.forward_conv(f.weight, f.bias, f.s, f.t, int_attribute(node, "group", 1))


class ConvTransposeForward(_ConvLike):
    consumers = ("ConvTranspose",)

    def channels(self, node: NodeProto, weight: Weight, group: int) -> int | Skip:
        kernel = weight.shape[2:]
        strides = ints_attribute(node, "strides")
        out_pad = ints_attribute(node, "output_padding")
        if any(k != 1 for k in kernel) or any(v != 1 for v in strides) or any(out_pad):
            return Skip(
                f"a ConvTranspose with kernel {list(kernel)} and strides {strides or [1]} gives border outputs "
                "fewer taps than inner ones; only a 1×1 stride-1 ConvTranspose is exact"
            )
        if weight.shape[0] % group:
            return Skip(f"weight {weight.shape} does not fit group={group}")
        return int(weight.shape[0])

    def fold(self, node: NodeProto, f: Forward) -> tuple[F64, F64]:
        group = int_attribute(node, "group", 1)
        return folding.forward_conv_transpose_1x1(f.weight, f.bias, f.s, f.t, group)


class GemmForward(ForwardRule):
    consumers = ("Gemm",)
    through_flatten = True

    def features(
        self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, reads: str, flattened: bool
    ) -> int | Skip:
        if weight.ndim != 2:
            return Skip(f"weight of rank {weight.ndim}")
        refused = gemm_before_opset_7(g)
        if refused is not None:
            return refused
        if attribute(node, "transA", 0):
            return Skip("transA=1: the map's channel axis is Gemm's M axis, not the contracted one")
        return int(weight.shape[1] if attribute(node, "transB", 0) else weight.shape[0])

    def fold(self, node: NodeProto, f: Forward) -> tuple[F64, F64]:
        return fold_gemm_node(node, folding.forward_gemm, f.weight, f.bias, f.s, f.t)


class MatMulForward(ForwardRule):
    """MatMul with a constant 2-D weight on the right, optionally followed by Add of a constant bias."""

    consumers = ("MatMul",)
    through_flatten = True

    def bias(self, g: Graph, layer: int) -> Weight | Skip | None:
        add = _bias_add(g, layer)
        return None if add is None else _add_constant(g, add, g.node(layer).output[0])

    def features(
        self, g: Graph, node: NodeProto, weight: Weight, info: ValueInfo, reads: str, flattened: bool
    ) -> int | Skip:
        if weight.ndim != 2:
            return Skip(f"weight of rank {weight.ndim}")
        rank = info.rank(reads)
        if rank != 2 and not flattened:
            shown = "unknown" if rank is None else str(rank)
            return Skip(f"the map's channel axis 1 is the contracted axis only for a 2-D left operand (rank {shown})")
        return int(weight.shape[0])

    def fold(self, node: NodeProto, f: Forward) -> tuple[F64, F64]:
        return folding.forward_matmul(f.weight, f.bias, f.s, f.t)

    def write_bias(self, g: Graph, layer: int, bias: Weight) -> None:
        node = g.node(layer)
        add = _bias_add(g, layer)
        if add is not None:
            position = 1 if g.node(add).input[0] == node.output[0] else 0
            g.write_constant(add, position, bias, folded_name(node, "bias"))
        else:  # last: the MatMul is re-inserted with the Add after it, under a new id
            add_after(g, layer, bias, folded_name(node, "bias"))


DEFAULT_RULES: tuple[ForwardRule, ...] = (ConvForward(), ConvTransposeForward(), GemmForward(), MatMulForward())

#: The linear layers a map can be folded forward into.
LAYERS = tuple(op for rule in DEFAULT_RULES for op in rule.consumers)


def _rule_for(node: NodeProto, rules: tuple[ForwardRule, ...]) -> ForwardRule | None:
    return next((rule for rule in rules if node.op_type in rule.consumers), None)


def match(
    g: Graph, affine: Affine, info: ValueInfo, rules: tuple[ForwardRule, ...] = DEFAULT_RULES
) -> Forward | Skip | None:
    """A forward fold of ``affine``; None when its output does not go (alone) to a linear layer at all."""
    layers = tuple(op for rule in rules for op in rule.consumers)
    first = g.sole_reader(affine.output)
    if first is None:
        readers = [i for i in set(g.users(affine.output)) if i != SUBGRAPH and g.node(i).op_type in layers]
        if readers and len(set(g.users(affine.output))) > 1:
            shown = ", ".join(f"{g.node(i).op_type} {display_name(g.node(i))}" for i in sorted(readers))
            return Skip(f"forward: its output has {len(set(g.users(affine.output)))} readers, not one ({shown})")
        return None
    flatten: int | None = None
    reads = affine.output
    if g.node(first).op_type in FLATTENERS:
        flatten, reads = first, g.node(first).output[0]
        layer = g.sole_reader(reads)
        if layer is None:
            return None
        rule = _rule_for(g.node(layer), rules)
        if rule is None or not rule.through_flatten:
            return None
    else:
        layer = first
        rule = _rule_for(g.node(layer), rules)
        if rule is None:
            return None
    node = g.node(layer)
    what = f"{node.op_type} {display_name(node)}"
    prefix = f"forward into {what}"
    if flatten is not None and g.node(flatten).input[0] != affine.output:
        return Skip(f"{prefix}: the map feeds the shape input of {display_name(g.node(flatten))}")
    if node.input[0] != reads or list(node.input).count(reads) != 1:
        return Skip(f"{prefix}: the map does not feed its data input (input 0) alone")
    weight = g.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        why = g.why_not_constant(node.input[1]) if len(node.input) > 1 else "it has none"
        return Skip(f"{prefix}: its weight is not a constant ({why})")
    if np.dtype(weight.dtype) not in FOLDABLE_DTYPES:
        return Skip(f"{prefix}: its weight is {weight.dtype}, not a foldable float type")
    bias = rule.bias(g, layer)
    if isinstance(bias, Skip):
        return Skip(f"{prefix}: {bias.reason}")
    repeat = 1
    if flatten is not None:
        proved = _flattened(g, info, affine, g.node(flatten))
        if isinstance(proved, Skip):
            return Skip(f"{prefix}: {proved.reason}")
        repeat = proved
    inputs = rule.features(g, node, weight, info, reads, flatten is not None)
    if isinstance(inputs, Skip):
        return Skip(f"{prefix}: {inputs.reason}")
    channels, features = inputs // repeat, inputs
    size = max(affine.s.size, affine.t.size)
    if inputs % repeat or size not in (1, channels):
        return Skip(f"{prefix}: it reads {features} input features, the map has {size} channels × {repeat}")
    s = np.repeat(np.broadcast_to(affine.s, (channels,)), repeat)
    t = np.repeat(np.broadcast_to(affine.t, (channels,)), repeat)
    if flatten is not None:
        f = g.node(flatten)
        what = f"{what} through {f.op_type} {display_name(f)}"
    return Forward(rule, affine, layer, flatten, weight, bias, s, t, what)


def _flattened(g: Graph, info: ValueInfo, affine: Affine, node: NodeProto) -> int | Skip:
    """``R`` when ``node`` turns the map's ``(N, C, rest…)`` into ``(N, C·R)``, proved from static shapes."""
    layout = info.channel_layout(affine.output, 1) or info.channel_layout(affine.input, 1)
    out = info.shape(node.output[0])
    what = f"{node.op_type} {display_name(node)}"
    if layout is None or out is None or len(out) != 2 or out[1] is None:
        return Skip(f"the static shapes needed to prove that {what} keeps whole channels are unknown")
    channels, inner = layout
    if out[1] != channels * inner:
        return Skip(f"{what} gives rows of {out[1]} features, not {channels} channels × {inner}")
    return inner


def _bias_add(g: Graph, matmul: int) -> int | None:
    """The Add of a constant that alone reads the MatMul's output, if any."""
    out = g.node(matmul).output[0]
    add = g.sole_reader(out)
    if add is None or g.node(add).op_type != "Add":
        return None
    return add if _add_constant(g, add, out) is not None else None


def _add_constant(g: Graph, add: int, x: str) -> NDArray[Any] | None:
    node = g.node(add)
    if len(node.input) != 2 or list(node.input).count(x) != 1:
        return None
    value = g.constant(node.input[1] if node.input[0] == x else node.input[0])
    if value is None or np.dtype(value.dtype) not in FOLDABLE_DTYPES or value.ndim > 1:
        return None
    return value
