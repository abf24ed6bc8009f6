"""Making a loaded model fit for rewriting, the way ONNX Runtime reads it: nodes in topological order, and
initializers that are also listed as graph inputs read as the weights they are.

* Sorting: ONNX Runtime runs a graph whose nodes are out of order (it sorts them itself); onnx.checker refuses
  it. :func:`sort_nodes` sorts every graph (subgraphs of If/Loop/Scan included) stably, keeping the original
  order wherever it is already valid, and refuses only what ONNX Runtime refuses: a node reading a value that
  nothing produces, or a cycle. Errors name the node (its name, or its index and op type when it has none).
* Shapeless graph outputs: onnx.checker refuses a graph output whose tensor type has no shape (hand-edited
  graphs have them); ONNX Runtime runs it. :func:`infer_output_shapes` gives it the shape ONNX shape inference
  finds.
* Initializers listed as inputs: the ONNX spec lets a runtime override such an initializer (IR >= 4), but no
  deployed model is run that way. :func:`constant_initializer_inputs` removes them from the graph inputs so that
  they are constants; an IR 3 model (where every initializer must be listed) becomes IR 4, so that the folded
  weights need not be inputs either.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import onnx
from onnx import GraphProto, ModelProto, NodeProto

from converter.errors import InputError
from converter.graph import outer_references, subgraphs

#: IR version from which an initializer listed as a graph input may be overridden at run time.
OVERRIDABLE_FROM_IR = 4


def infer_output_shapes(model: ModelProto) -> list[str]:
    """Give each graph output declared without a shape the shape that ONNX shape inference finds for it (in
    place); return the names of those given one. Outputs inference cannot shape stay as they are."""
    missing = [
        o for o in model.graph.output if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")
    ]
    if not missing:
        return []
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):  # the checker's message then says what is wrong
        return []
    found = {o.name: o.type.tensor_type for o in inferred.graph.output if o.type.tensor_type.HasField("shape")}
    shaped = []
    for out in missing:
        if out.name in found:
            out.type.tensor_type.shape.CopyFrom(found[out.name].shape)
            shaped.append(out.name)
    return shaped


def node_label(index: int, node: NodeProto) -> str:
    """How errors name a node: ``node 'conv1'``, or ``node 3 (Conv, unnamed)``."""
    return f"node {node.name!r}" if node.name else f"node {index} ({node.op_type}, unnamed)"


def sort_nodes(graph: GraphProto, outer: frozenset[str] = frozenset()) -> int:
    """Put the nodes of ``graph`` and of every subgraph in topological order; return how many graphs changed.

    ``outer``: the names an enclosing graph makes visible. Raises :class:`InputError` for a node that reads a
    value nothing produces, or for a cycle.
    """
    nodes = list(graph.node)
    known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                producer[name] = i
    needs: list[set[int]] = []
    readers: dict[int, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        reads = set(node.input)
        for sub in subgraphs(node):
            reads |= outer_references(sub)
        deps = set()
        for name in reads:
            if name in producer:
                deps.add(producer[name])
            elif name not in known:
                raise InputError(
                    f"invalid ONNX model: {node_label(i, node)} reads {name!r}, which no node, graph input or "
                    "initializer produces"
                )
        needs.append(deps)
        for d in deps:
            readers[d].append(i)
    waiting = [len(d) for d in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers[i]:
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        stuck = min(i for i, w in enumerate(waiting) if w > 0)
        raise InputError(f"invalid ONNX model: the graph has a cycle through {node_label(stuck, nodes[stuck])}")
    changed = int(order != list(range(len(nodes))))
    if changed:
        graph.ClearField("node")
        graph.node.extend(nodes[i] for i in order)
    visible = frozenset(known | set(producer))
    for node in graph.node:
        for sub in subgraphs(node):
            changed += sort_nodes(sub, visible)
    return changed


def is_sorted(graph: GraphProto) -> bool:
    """True when every node reads only values produced before it (subgraphs included)."""
    seen = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    return _sorted(graph, seen)


def _sorted(graph: GraphProto, seen: set[str]) -> bool:
    seen = seen | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    producers = {o for n in graph.node for o in n.output}
    for node in graph.node:
        if any(name in producers and name not in seen for name in node.input):
            return False
        for sub in subgraphs(node):
            if any(name in producers and name not in seen for name in outer_references(sub)):
                return False
            if not _sorted(sub, seen):
                return False
        seen.update(node.output)
    return True


def initializer_inputs(model: ModelProto) -> list[str]:
    """Names of the initializers that the main graph also lists as inputs, in input order."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name in inits]


def constant_initializer_inputs(model: ModelProto, keep_overridable: bool = False) -> list[str]:
    """Drop the initializers listed as graph inputs from the inputs (they become constants); return their names.

    With ``keep_overridable`` an IR >= 4 model is left as it is (they stay inputs a caller may override, so
    not constants); an IR 3 model is always normalised, as IR 3 gives such initializers no override.
    """
    names = initializer_inputs(model)
    if not names or (keep_overridable and model.ir_version >= OVERRIDABLE_FROM_IR):
        return []
    drop = set(names)
    kept = [i for i in model.graph.input if i.name not in drop]
    model.graph.ClearField("input")
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, OVERRIDABLE_FROM_IR)
    return names


def initializer_note(names: list[str], ir_version: int) -> str:
    """The report's line for :func:`constant_initializer_inputs`."""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    if ir_version < OVERRIDABLE_FROM_IR:
        return (
            f"IR {ir_version} model: its {len(names)} initializer(s) were also listed as graph inputs (as IR 3 "
            f"requires); written as IR {OVERRIDABLE_FROM_IR}, without them among the inputs ({shown})"
        )
    return (
        f"{len(names)} initializer(s) also listed as graph inputs were treated as constants and removed from the "
        f"inputs ({shown}); keep_overridable_initializers=True (--keep-overridable-initializers) keeps them "
        "overridable"
    )
