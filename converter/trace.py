"""Where a converted graph first departs from the original: the first node, in topological order, whose
output differs beyond tolerance, comparing the intermediate tensors both graphs share by name.

Both models are run once on the same inputs with every shared intermediate tensor exposed as a graph output
(ONNX Runtime, optimisations off). Tensors computed from constants alone (Constant nodes, weight reshapes)
are skipped: a fold rewrites weights on purpose. A fold keeps the BN's output name on the node that absorbed
it, so a wrong fold shows up at the BN's output (backward fold) or at the reading layer's (forward fold).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, ValueInfoProto

from converter import modelio
from converter.graph import display_name
from converter.verify import ModelSource, cast_feeds, compare, session

Array = NDArray[Any]


@dataclass
class Divergence:
    node: str  # display name of the first node (of the original graph) whose output differs
    op_type: str
    tensor: str  # that output
    max_abs: float
    max_rel: float
    layer: str | None = None  # the BatchNorm (or Mul/Add chain) whose conversion is responsible
    fold: str | None = None  # what was done to it: "folded into Conv conv2"


@dataclass
class Trace:
    inputs_from: str  # which inputs the models ran on
    compared: int  # shared intermediate tensors compared
    divergence: Divergence | None = None
    skipped: list[str] = field(default_factory=list)  # why some tensors could not be compared

    def lines(self) -> list[str]:
        if self.divergence is None:
            return [f"trace: the {self.compared} shared intermediate tensors agree ({self.inputs_from})"]
        d = self.divergence
        blame = f"; responsible: {d.layer} ({d.fold})" if d.layer else ""
        return [
            f"trace: first diverging node {d.node} ({d.op_type}), output {d.tensor}: max abs {d.max_abs:.3g}, "
            f"max rel {d.max_rel:.3g}{blame}"
        ]


def _model(source: ModelSource) -> ModelProto:
    if isinstance(source, ModelProto):
        return source
    if isinstance(source, bytes):
        model = ModelProto()
        model.ParseFromString(source)
        return model
    return modelio.load(source).model


def _computed(model: ModelProto) -> list[tuple[str, str, str]]:
    """(tensor, node display name, op type) of every top-level node output that depends on a graph input."""
    graph = model.graph
    constant = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    out: list[tuple[str, str, str]] = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or all(i in constant for i in inputs):
            constant.update(o for o in node.output if o)
            continue
        out.extend((o, display_name(node), node.op_type) for o in node.output if o)
    return out


def _expose(model: ModelProto, names: list[str]) -> bytes:
    copy = ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(ValueInfoProto(name=name))
    data: bytes = copy.SerializeToString()
    return data


def first_divergence(
    reference: ModelSource,
    converted: ModelSource,
    feeds: Mapping[str, Array],
    *,
    atol: float,
    rtol: float,
    inputs_from: str,
) -> Trace:
    """Compare every shared intermediate tensor; the first (topological order of ``reference``) that fails
    the verification's test is the divergence."""
    ref, conv = _model(reference), _model(converted)
    conv_names = {o for n in conv.graph.node for o in n.output if o}
    shared = [(t, node, op) for t, node, op in _computed(ref) if t in conv_names]
    names = [t for t, _, _ in shared]
    sess = session(_expose(ref, names))
    want = dict(zip(names, sess.run(names, dict(feeds)), strict=True))
    del sess
    sess = session(_expose(conv, names))
    got = dict(zip(names, sess.run(names, cast_feeds(sess, feeds, "the original")), strict=True))
    del sess
    trace = Trace(inputs_from, len(shared))
    for tensor, node, op in shared:
        check = compare(tensor, np.asarray(got[tensor]), np.asarray(want[tensor]), atol, rtol)
        if not check.passed:
            trace.divergence = Divergence(node, op, tensor, check.max_abs, check.max_rel)
            break
    return trace
