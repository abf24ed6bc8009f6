"""A small mutable index over an ONNX GraphProto: producers, consumers, constants, unique names.

Rewrites record their changes here (nodes replaced, initializers set) and :meth:`Graph.commit` writes the
node list back once, in the original topological order with each replacement in its predecessor's place.
Values that nodes inside subgraphs (If/Loop/Scan bodies) read from this graph count as consumers, so a fold
never changes a value that a subgraph still sees.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, numpy_helper

from converter import consteval

#: Pseudo consumer index for a value read implicitly by a subgraph.
SUBGRAPH = -1

#: A node attribute's value, or ``default``; an int attribute (``default`` unless it is an int); a list of ints
#: ([] when absent). Defined with the evaluator, which needs them first.
attribute = consteval.attribute
int_attribute = consteval.int_attribute
ints_attribute = consteval.ints_attribute

#: ONNX element types a ``CastLike`` constant is evaluated to, with their numpy types.
_CASTS: dict[int, np.dtype[Any]] = {int(t): onnx.helper.tensor_dtype_to_np_dtype(t) for t in consteval.CASTABLE}

#: Side-effect-free ops that :meth:`Graph.prune` removes once nothing reads them.
PRUNABLE = consteval.OPS | {"Constant"}


def subgraphs(node: NodeProto) -> Iterator[GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(graph: GraphProto) -> Iterator[GraphProto]:
    """``graph`` and every subgraph in it (If/Loop/Scan bodies, at any depth), outermost first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from all_graphs(sub)


def nested_nodes(graph: GraphProto) -> Iterator[NodeProto]:
    """Every node inside the subgraphs of ``graph``'s nodes, at any depth (not ``graph``'s own nodes)."""
    for node in graph.node:
        for sub in subgraphs(node):
            yield from sub.node
            yield from nested_nodes(sub)


def outer_references(graph: GraphProto) -> set[str]:
    """Names a subgraph reads without defining them itself (recursively)."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        defined.update(node.output)
        used.update(n for n in node.input if n)
        for sub in subgraphs(node):
            used |= outer_references(sub)
    used.update(o.name for o in graph.output)
    return used - defined


def display_name(node: NodeProto) -> str:
    """The node's name, or ``OpType(first output)`` for unnamed nodes."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


class Graph:
    """Index over ``model.graph``; see the module docstring."""

    def __init__(self, model: ModelProto, graph: GraphProto | None = None, outer: Graph | None = None) -> None:
        """``graph``: a subgraph of ``model`` (an If/Loop/Scan body) whose enclosing graph is indexed by ``outer``;
        values it reads from there are constants when they are constants there."""
        self.model = model
        self.graph = model.graph if graph is None else graph
        self.outer = outer
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            onnx.defs.onnx_opset_version(),
        )
        #: Static dims and element type of a value as the model declares them (``ValueInfo.shape``/``elem_type``):
        #: ``Shape``/``Size`` of an activation with static dims, and ``CastLike`` to its type, are constants.
        self.static_shape: Callable[[str], list[int | None] | None] = lambda name: None
        self.elem_type: Callable[[str], int | None] = lambda name: None
        self._evaluated: dict[str, NDArray[Any] | None] = {}  # reference-evaluator results: kept across edits
        self._arrays: dict[str, NDArray[Any]] = {}  # initializers as arrays, until one is overwritten
        self._why: dict[str, str] = {}
        self._build()

    def _build(self) -> None:
        self.nodes: list[NodeProto] = list(self.graph.node)
        # slot k holds the ids of the nodes standing where the k-th original node stood
        self._slots: list[list[int]] = [[i] for i in range(len(self.nodes))]
        self._slot_of: list[int] = list(range(len(self.nodes)))
        self.removed: set[int] = set()
        self.initializers: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        # IR < 4 lists every initializer as an input; only from IR 4 on does that make it overridable.
        main = self.graph is self.model.graph
        self.overridable = self.inputs & set(self.initializers) if self.model.ir_version >= 4 and main else set()
        self.producers: dict[str, int] = {}
        self._constants: dict[str, NDArray[Any] | None] = {}
        self._visiting: set[str] = set()
        self.consumers: dict[str, list[int]] = defaultdict(list)
        # one set for the whole model: a name made in a subgraph must not shadow (or be shadowed by) another
        self.names: set[str] = self.outer.names if self.outer is not None else set()
        self.names |= set(self.inputs) | set(self.initializers) | self.outputs
        for idx, node in enumerate(self.nodes):
            self._index(idx, node)

    def _index(self, idx: int, node: NodeProto) -> None:
        if node.name:
            self.names.add(node.name)
        for name in node.output:
            if name:
                self.producers[name] = idx
                self.names.add(name)
        for name in node.input:
            if name:
                self.consumers[name].append(idx)
        for sub in subgraphs(node):
            for name in outer_references(sub):
                self.consumers[name].append(SUBGRAPH)
            self.names |= _all_names(sub)

    # ----------------------------------------------------------------------------------------- queries
    def node(self, idx: int) -> NodeProto:
        return self.nodes[idx]

    def producer(self, name: str) -> int | None:
        return self.producers.get(name)

    def users(self, name: str) -> list[int]:
        """Ids of the nodes reading ``name`` (one entry per read; SUBGRAPH for a subgraph)."""
        return self.consumers.get(name, [])

    def sole_user(self, name: str, idx: int) -> bool:
        """True when node ``idx`` is the only reader of ``name`` and ``name`` is not a graph output."""
        return name not in self.outputs and set(self.users(name)) == {idx}

    def sole_reader(self, name: str, *, once: bool = False) -> int | None:
        """The id of the one node reading ``name``, when that node is a standard ONNX op, no subgraph reads
        ``name`` and it is not a graph output; else None. ``once``: the node must also read it at one input only.
        """
        users = set(self.users(name))
        if name in self.outputs or len(users) != 1 or SUBGRAPH in users:
            return None
        idx = users.pop()
        node = self.nodes[idx]
        if node.domain not in ("", "ai.onnx") or (once and list(node.input).count(name) != 1):
            return None
        return idx

    def constant(self, name: str) -> NDArray[Any] | None:
        """The value of ``name`` when it is a constant, else None (:meth:`why_not_constant` says why).

        A constant is an initializer that is not also an overridable graph input, a ``Constant`` node's value,
        ``Shape``/``Size`` of a value whose shape is static, or the output of a standard-domain node whose inputs
        are all constants (:mod:`converter.consteval`: the shape ops in numpy, any other deterministic op with
        ONNX Runtime or the ONNX reference evaluator, within :data:`converter.consteval.MAX_ELEMENTS`), at any
        depth. In a
        subgraph, a value of the enclosing graph is a constant when it is one there. Values are cached until
        the next edit; that a value is *not* a constant is kept until its node changes (a fold never turns an
        activation into a constant), so repeated questions about activations stay cheap on large graphs.
        """
        if not name:
            return None
        if name in self._constants:
            return self._constants[name]
        pending = [name]
        while pending:  # iterative post-order: deep Identity chains need no recursion
            current = pending[-1]
            if current in self._constants:
                pending.pop()
                continue
            needed = self._constant_inputs(current)
            missing = [i for i in needed if i and i not in self._constants]
            if missing and not any(i and i in self._constants and self._constants[i] is None for i in needed):
                pending.extend(missing)  # (an input already known not to be a constant settles it at once)
                continue
            pending.pop()
            self._constants[current] = self._evaluate(current)
        return self._constants[name]

    def why_not_constant(self, name: str) -> str:
        """Why ``name`` is not a constant: the first cause found on the way to it, as a clause."""
        if self.constant(name) is not None:
            return "it is a constant"
        return self._why.get(name) or f"{name!r} is not a constant"

    def _constant_inputs(self, name: str) -> list[str]:
        """Names whose values ``name``'s value is computed from (none for leaves)."""
        if name in self.initializers or name in self._visiting or name in self._evaluated:
            return []
        idx = self.producers.get(name)
        if idx is None:
            return []
        node = self.nodes[idx]
        if node.op_type in ("Shape", "Size") and node.input and self._static_dims(node.input[0]) is not None:
            return []
        if node.op_type == "CastLike" and len(node.input) == 2 and self.elem_type(node.input[1]) in _CASTS:
            self._visiting.add(name)
            return [node.input[0]]
        fast = node.op_type in consteval.OPS and node.output[0] == name
        if not fast and not consteval.evaluable(node):
            return []
        self._visiting.add(name)  # a malformed cyclic graph ends here instead of looping
        return list(node.input)

    def _static_dims(self, name: str) -> list[int] | None:
        dims = self.static_shape(name)
        if dims is None or any(d is None for d in dims):
            return None
        return [int(d) for d in dims if d is not None]

    def _evaluate(self, name: str) -> NDArray[Any] | None:
        self._visiting.discard(name)
        if name in self.initializers:
            if name in self.overridable:
                self._why[name] = (
                    f"{name!r} is an initializer also listed as a graph input, kept overridable "
                    "(keep_overridable_initializers)"
                )
                return None
            if name not in self._arrays:
                self._arrays[name] = numpy_helper.to_array(self.initializers[name])
            return self._arrays[name]
        if name in self._evaluated:
            return self._evaluated[name]
        idx = self.producers.get(name)
        if idx is None:
            return self._leaf(name)
        node = self.nodes[idx]
        if node.domain not in ("", "ai.onnx"):
            return self._not(name, consteval.why_not_evaluable(node))
        if node.op_type == "Constant":
            value = _constant_node_value(node)
            return value if value is not None else self._not(name, "a sparse or string Constant")
        if node.op_type in ("Shape", "Size") and node.input:
            dims = self._static_dims(node.input[0])
            if dims is not None:
                return _shape_value(node, dims)
        if node.op_type == "CastLike" and len(node.input) == 2 and self.elem_type(node.input[1]) in _CASTS:
            value = self._constants.get(node.input[0])
            if value is None:
                self._why[name] = self._why.get(node.input[0]) or f"{node.input[0]!r} is not a constant"
                return None
            target = self.elem_type(node.input[1])
            return consteval.cast_to(value, _CASTS[target]) if target is not None else None
        fast = node.op_type in consteval.OPS and node.output[0] == name
        if not fast and not consteval.evaluable(node):
            return self._not(name, consteval.why_not_evaluable(node))
        inputs = [self._constants.get(i) if i else None for i in node.input]
        failing = [i for i, value in zip(node.input, inputs, strict=True) if i and value is None]
        if failing:
            i = next((f for f in failing if f in self._constants), failing[0])  # one known not to be constant
            if node.op_type in ("Shape", "Size"):
                return self._not(name, f"the {node.op_type.lower()} of {i!r}, which is not static")
            self._why[name] = self._why.get(i) or f"{i!r} is not a constant"
            return None
        if fast:
            value = consteval.evaluate(node, inputs, self.opset)
            if value is not None:
                return value
        results = consteval.evaluate_node(node, inputs, self.opset)
        if isinstance(results, consteval.NotConstant):
            for out in node.output:
                self._evaluated[out] = None
            return self._not(name, results)
        for out, value in zip([o for o in node.output if o], results, strict=False):
            self._evaluated[out] = value
        return self._evaluated.get(name)

    def _leaf(self, name: str) -> NDArray[Any] | None:
        """A value no node of this graph produces: an input, or (in a subgraph) a value of the enclosing graph."""
        if name in self.inputs:
            return self._not(name, "a graph input")
        if self.outer is not None:
            value = self.outer.constant(name)
            if value is None:
                self._why[name] = self.outer.why_not_constant(name)
            return value
        return self._not(name, "produced by no node")

    def _not(self, name: str, why: str) -> NDArray[Any] | None:
        """Record why ``name`` is not a constant; None."""
        self._why[name] = f"{name!r} is {why}"
        return None

    def live_nodes(self) -> Iterator[tuple[int, NodeProto]]:
        """(id, node) of every node still in the graph, in topological order."""
        for slot in self._slots:
            for idx in slot:
                yield idx, self.nodes[idx]

    # ------------------------------------------------------------------------------------------- edits
    def unique_name(self, base: str) -> str:
        base = base or "bnfold"
        name, k = base, 0
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def _edited(self, outputs: Iterable[str] = (), initializer: str | None = None) -> None:
        """Forget cached constant values (a weight was written); what is known not to be a constant stays, but
        for the outputs of a node that changed. Reference-evaluator results go when a node that made one changes."""
        outputs = set(outputs)
        self._constants = {k: v for k, v in self._constants.items() if v is None and k not in outputs}
        for name in outputs:
            self._why.pop(name, None)
        if initializer is not None:
            self._arrays.pop(initializer, None)
        if outputs & set(self._evaluated):
            self._evaluated.clear()

    def add_initializer(self, base: str, value: NDArray[Any]) -> str:
        """A new initializer under a name unused anywhere in the model."""
        self._edited()
        name = self.unique_name(base)
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def set_input(self, idx: int, position: int, name: str) -> None:
        node = self.nodes[idx]
        self._edited(node.output)
        old = node.input[position] if position < len(node.input) else ""
        if old:
            self.consumers[old].remove(idx)
        while len(node.input) <= position:
            node.input.append("")
        node.input[position] = name
        if name:
            self.consumers[name].append(idx)

    def write_constant(self, idx: int, position: int, value: NDArray[Any], base: str) -> str:
        """Make input ``position`` of node ``idx`` the constant ``value``.

        A private initializer is overwritten under its own name; anything else (shared, a Constant node,
        behind Identity, absent) gets a fresh initializer and the old source is left to :meth:`prune`.
        """
        node = self.nodes[idx]
        current = node.input[position] if position < len(node.input) else ""
        if current in self.initializers and current not in self.overridable and self.sole_user(current, idx):
            self._edited(initializer=current)
            self.initializers[current].CopyFrom(numpy_helper.from_array(value, current))
            return current
        name = self.add_initializer(base, value)
        self.set_input(idx, position, name)
        return name

    def replace_node(self, idx: int, new_nodes: Iterable[NodeProto]) -> list[int]:
        """Put ``new_nodes`` where node ``idx`` stands (none removes it); return their ids."""
        old = self.nodes[idx]
        self._edited(old.output)
        for name in old.input:
            if name and idx in self.consumers.get(name, []):
                self.consumers[name].remove(idx)
        for name in old.output:
            if self.producers.get(name) == idx:
                del self.producers[name]
        self.removed.add(idx)
        slot = self._slots[self._slot_of[idx]]
        ids = []
        for node in new_nodes:
            new_id = len(self.nodes)
            self.nodes.append(node)
            self._slot_of.append(self._slot_of[idx])
            self._index(new_id, node)
            ids.append(new_id)
        at = slot.index(idx)
        slot[at : at + 1] = ids
        return ids

    def rename_output(self, idx: int, position: int, name: str) -> None:
        """Node ``idx`` now writes ``name`` (taking over a value whose producer was removed)."""
        node = self.nodes[idx]
        self._edited([*node.output, name])
        old = node.output[position]
        if self.producers.get(old) == idx:
            del self.producers[old]
        node.output[position] = name
        self.producers[name] = idx

    def prune(self) -> int:
        """Drop unused initializers, and unused Constant and constant-expression nodes (Identity, Transpose,
        Reshape ... of :data:`converter.consteval.OPS`, and any evaluable node whose inputs are all constants:
        side-effect free); return how many were removed."""
        removed = 0
        changed = True
        while changed:
            changed = False
            for idx, node in list(self.live_nodes()):
                if not self._prunable(node):
                    continue
                if any(self.users(o) or o in self.outputs for o in node.output):
                    continue
                self.replace_node(idx, [])
                removed += 1
                changed = True
        dead = {
            name
            for name in self.initializers
            if not self.users(name) and name not in self.outputs and name not in self.inputs
        }
        if dead:  # deleted in place: rebuilding the list would copy every kept tensor
            for i in reversed(range(len(self.graph.initializer))):
                if self.graph.initializer[i].name in dead:
                    del self.graph.initializer[i]
            self.initializers = {t.name: t for t in self.graph.initializer}
            removed += len(dead)
        return removed

    def settle_metadata_reads(self) -> int:
        """Replace each ``Shape``, ``Size`` and ``CastLike`` node whose output is a constant by a ``Constant`` node:
        they read an activation for its shape or type only, yet would count as one more reader of it (and keep
        its producer from folding). Returns how many were replaced."""
        replaced = 0
        for idx, node in list(self.live_nodes()):
            if node.op_type not in ("Shape", "Size", "CastLike") or node.domain not in ("", "ai.onnx"):
                continue
            value = self.constant(node.output[0])
            if value is None:
                continue
            const = onnx.helper.make_node(
                "Constant",
                [],
                [node.output[0]],
                name=self.unique_name(f"{node.name or node.op_type}_value"),
                value=numpy_helper.from_array(np.asarray(value)),
            )
            self.replace_node(idx, [const])
            replaced += 1
        return replaced

    def _prunable(self, node: NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type in PRUNABLE:
            return True
        if any(self.users(o) or o in self.outputs for o in node.output):
            return False
        if node.op_type in ("Shape", "Size") and node.input and self._static_dims(node.input[0]) is not None:
            return True
        return consteval.evaluable(node) and all(self.constant(i) is not None for i in node.input if i)

    def commit(self) -> None:
        """Write the node list back to the GraphProto and re-index it."""
        if not self.removed:
            return
        nodes = [node for _, node in self.live_nodes()]
        self.graph.ClearField("node")
        self.graph.node.extend(nodes)
        self._build()

    def reindex(self) -> None:
        """Index the graph again after its subgraphs changed (what they read from it, the names they made)."""
        self.commit()
        self._build()


def _all_names(graph: GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        if node.name:
            names.add(node.name)
        for sub in subgraphs(node):
            names |= _all_names(sub)
    return names


def _constant_node_value(node: NodeProto) -> NDArray[Any] | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse_value and string constants are not folded


def _shape_value(node: NodeProto, dims: list[int]) -> NDArray[Any]:
    """``Shape`` (with its opset-15 ``start``/``end``) or ``Size`` of a tensor with static ``dims``."""
    if node.op_type == "Size":
        return np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
    rank = len(dims)
    start = consteval.int_attribute(node, "start", 0)
    end = consteval.int_attribute(node, "end", rank)
    start, end = (min(max(a + rank if a < 0 else a, 0), rank) for a in (start, end))
    return np.array(dims[start:end], dtype=np.int64)
