"""The per-channel map ``y = s·x + t`` that folds look for, how a fold was found, and the graph edits they share."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from numpy.typing import NDArray
from onnx import NodeProto, helper

from converter.folding import F64
from converter.graph import Graph


class FoldKind(StrEnum):
    """Which rule folded a map (recorded per layer in the report)."""

    BACKWARD = "backward"  # into the node producing the map's input
    FORWARD = "forward"  # into the linear layer reading the map's output
    CONCAT_SPLIT = "concat split"  # split by channel ranges into the producers of a channel-axis Concat
    THROUGH_SHAPE = "through shape op"  # backward, across Squeeze/Unsqueeze/Reshape/Flatten that keep channels


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


def folded_name(node: NodeProto, role: str) -> str:
    """The base name of a folded constant of ``node`` (made unique by :meth:`Graph.unique_name`)."""
    stem = node.name or node.output[0]
    return f"{stem}_{role}_folded".replace("/", "_")


def add_after(g: Graph, idx: int, bias: NDArray[Any], base: str) -> int:
    """Insert ``Add(output, bias)`` after node ``idx``, taking over its output name; return the Add's id."""
    node = g.node(idx)
    out = node.output[0]
    bias_name = g.add_initializer(base, bias)
    fresh = g.unique_name(f"{out}_unbiased")
    g.rename_output(idx, 0, fresh)
    add = helper.make_node("Add", [fresh, bias_name], [out], name=g.unique_name(f"{base}_add"))
    _, add_id = g.replace_node(idx, [node, add])
    return add_id


def drop_attributes(node: NodeProto, names: tuple[str, ...]) -> None:
    keep = [a for a in node.attribute if a.name not in names]
    del node.attribute[:]
    node.attribute.extend(keep)
