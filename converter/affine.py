"""The per-channel map ``y = s·x + t`` that folds look for, the interface every fold implements (:class:`Fold`),
how a fold was found, and what the folds share: graph edits and Gemm's attributes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from numpy.typing import NDArray
from onnx import NodeProto, helper

from converter.folding import F64
from converter.graph import Graph, attribute
from converter.shapes import Cast


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


class Fold(Protocol):
    """A fold of a map that :func:`converter.rules.match` found: backward into the map's producer
    (:class:`converter.rules.Match`), split over a channel-axis Concat's producers (:class:`converter.rules.Split`)
    or forward into the linear layer reading the map (:class:`converter.forward.Forward`)."""

    @property
    def affine(self) -> Affine:
        """The map that is folded away."""
        ...

    @property
    def producer(self) -> int:
        """The node the report says the map was folded into (a split's Concat)."""
        ...

    @property
    def kind(self) -> FoldKind: ...

    @property
    def into(self) -> str:
        """The report's description of where the map went: ``Conv conv1``, ``… through Flatten f`` …"""
        ...

    @property
    def weight(self) -> NDArray[Any] | None:
        """The weight the fold rewrites, as it was (its readiness figures compare with it); None when the fold
        rewrites several weights (a split)."""
        ...

    def apply(self, g: Graph, cast: Cast) -> None:
        """Rewrite the graph: new constants computed in float64 and cast once with ``cast``; the map is gone."""
        ...


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


def gemm_before_opset_7(g: Graph) -> Skip | None:
    """Why no Gemm of this graph folds, either way: before opset 7, Gemm has the legacy broadcast attribute."""
    return Skip("Gemm before opset 7 (legacy broadcast attribute)") if g.opset < 7 else None


#: :func:`converter.folding.fold_gemm` or :func:`converter.folding.forward_gemm`: (B, C, s, t, alpha, beta, transB).
GemmArithmetic = Callable[[NDArray[Any], NDArray[Any] | None, F64, F64, float, float, bool], tuple[F64, F64]]


def fold_gemm_node(
    node: NodeProto, arithmetic: GemmArithmetic, b_mat: NDArray[Any], c: NDArray[Any] | None, s: F64, t: F64
) -> tuple[F64, F64]:
    """``arithmetic`` with the Gemm node's alpha, beta and transB; alpha and beta are then dropped from the node
    (the returned B′ and C′ carry them: ``Y = A′·B′ + C′``)."""
    alpha = float(attribute(node, "alpha", 1.0))  # type: ignore[arg-type]
    beta = float(attribute(node, "beta", 1.0))  # type: ignore[arg-type]
    trans_b = bool(attribute(node, "transB", 0))
    folded = arithmetic(b_mat, c, s, t, alpha, beta, trans_b)
    drop_attributes(node, ("alpha", "beta"))
    return folded
