"""BatchNormalization nodes as found, normalised to inference mode (``keep``), or rewritten as Mul+Add.

Inference mode: opset 14+ has ``training_mode`` (0 by default); before 14, a BatchNormalization with more
than one output is the training form. Either way, ONNX Runtime then normalises with the *batch* statistics.
When the extra outputs (running or saved statistics) feed nothing, the node is rewritten to the test form,
which uses the running statistics — what a model exported for inference means. When they are used, the
model really trains, and the conversion is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, helper

from converter.errors import ConversionError
from converter.folding import F64, FOLDABLE_DTYPES, bn_affine
from converter.graph import Graph, attribute, display_name
from converter.shapes import Cast, ValueInfo

DEFAULT_EPSILON = 1e-5


@dataclass
class BatchNormNode:
    """One BatchNormalization node of the main graph."""

    idx: int
    node: NodeProto
    name: str
    training: bool  # computes batch statistics as written (training_mode=1, or extra outputs before opset 14)
    s: F64 | None = None  # the per-channel map y = s·x + t, when every parameter is a constant
    t: F64 | None = None
    not_constant: str | None = None  # why s and t are unknown

    @property
    def input(self) -> str:
        return str(self.node.input[0])

    @property
    def output(self) -> str:
        return str(self.node.output[0])


def find(g: Graph) -> list[BatchNormNode]:
    """Every BatchNormalization of the main graph, in topological order, parsed."""
    return [parse(g, idx) for idx, node in g.live_nodes() if is_batchnorm(node)]


def is_batchnorm(node: NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def parse(g: Graph, idx: int) -> BatchNormNode:
    node = g.node(idx)
    name = display_name(node)
    if len(node.input) != 5 or not all(node.input):
        raise ConversionError(f"{name}: BatchNormalization needs 5 inputs, has {len(node.input)}")
    if g.opset >= 14:
        training = bool(attribute(node, "training_mode", 0))
    else:
        training = sum(1 for o in node.output if o) > 1
    bn = BatchNormNode(idx=idx, node=node, name=name, training=training)
    if attribute(node, "spatial", 1) == 0:
        bn.not_constant = "spatial=0 (per-activation statistics) is not a per-channel map"
        return bn
    params = [g.constant(n) for n in node.input[1:]]
    roles = ("scale", "B", "mean", "var")
    missing = [(role, n) for role, n, p in zip(roles, node.input[1:], params, strict=True) if p is None]
    if missing:
        bn.not_constant = f"parameters are not constants ({_why_not(g, missing)})"
        return bn
    dtypes = {np.dtype(p.dtype) for p in params if p is not None}
    if not dtypes <= set(FOLDABLE_DTYPES):
        bn.not_constant = f"unsupported parameter dtype {', '.join(sorted(d.name for d in dtypes))}"
        return bn
    if any(p is not None and p.ndim != 1 for p in params):
        bn.not_constant = "parameters are not 1-D per-channel vectors"
        return bn
    eps = float(attribute(node, "epsilon", DEFAULT_EPSILON))  # type: ignore[arg-type]
    gamma, beta, mean, var = params
    bn.s, bn.t = bn_affine(gamma, beta, mean, var, eps, name)  # type: ignore[arg-type]
    return bn


def _why_not(g: Graph, missing: list[tuple[str, str]]) -> str:
    """``scale: why; var: why``, or ``scale 'a', var 'b': each is why`` when they share the cause."""
    whys = [g.why_not_constant(name) for _, name in missing]
    prefixes = [f"{name!r} is " for _, name in missing]
    tails = {why.removeprefix(p) for why, p in zip(whys, prefixes, strict=True)}
    if len(missing) > 1 and len(tails) == 1 and all(w.startswith(p) for w, p in zip(whys, prefixes, strict=True)):
        return f"{', '.join(f'{role} {name!r}' for role, name in missing)}: each is {tails.pop()}"
    return "; ".join(f"{role}: {why}" for (role, _), why in zip(missing, whys, strict=True))


def used_training_outputs(g: Graph, bn: BatchNormNode) -> list[str]:
    node = g.node(bn.idx)
    return [o for o in node.output[1:] if o and (g.users(o) or o in g.outputs)]


def normalise(g: Graph, bn: BatchNormNode) -> bool:
    """Rewrite ``bn`` to the single-output inference form; True when the node changed.

    Refuses (ConversionError) a training-mode node whose extra outputs are used.
    """
    node = g.node(bn.idx)
    used = used_training_outputs(g, bn)
    if used:
        raise ConversionError(
            f"{bn.name}: BatchNormalization is in training mode and its statistics outputs "
            f"({', '.join(used)}) are used; export the model in eval/inference mode"
        )
    changed = False
    if len(node.output) > 1:
        del node.output[1:]
        changed = True
    for i, attr in enumerate(node.attribute):
        if attr.name == "training_mode":
            del node.attribute[i]
            changed = True
            break
    return changed


def to_affine(g: Graph, bn: BatchNormNode, info: ValueInfo, cast: Cast) -> str | None:
    """Replace ``bn`` by Mul(x, s) then Add(·, t) with precomputed constants; return why not, or None."""
    if bn.s is None or bn.t is None:
        return bn.not_constant
    x = bn.input
    rank, elem = info.rank(x), info.elem_type(x)
    if rank is None or elem is None:
        return "the rank or dtype of its input is unknown (give input shapes for dynamic models)"
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    if np.dtype(dtype) not in FOLDABLE_DTYPES:
        return f"unsupported dtype {np.dtype(dtype).name}"
    shape = (-1,) + (1,) * (rank - 2)
    node = g.node(bn.idx)
    base = bn.name.replace("/", "_")
    scale = g.add_initializer(f"{base}_scale", cast(bn.s.reshape(shape), dtype, bn.name).reshape(shape))
    shift = g.add_initializer(f"{base}_shift", cast(bn.t.reshape(shape), dtype, bn.name).reshape(shape))
    scaled = g.unique_name(f"{base}_scaled")
    mul = helper.make_node("Mul", [x, scale], [scaled], name=g.unique_name(f"{base}_mul"))
    add = helper.make_node("Add", [scaled, shift], [node.output[0]], name=g.unique_name(f"{base}_add"))
    g.replace_node(bn.idx, [mul, add])
    return None
