"""The graph rewrite of a conversion, without verification: normalise every BatchNorm to inference mode,
fold what can be folded (until nothing changes), keep or make affine the rest, prune, then float16 if asked.

Each BatchNorm (and each Mul/Add chain that was folded) gets a :class:`~converter.report.LayerRecord`; a
fold's record carries the float64 statistics of the weights it wrote (:mod:`converter.readiness`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
from onnx import ModelProto

from converter import bn_modes, precision, readiness, rules
from converter.bn_modes import DEFAULT_EPSILON
from converter.folding import cast_exact
from converter.graph import Graph, all_graphs, attribute, display_name
from converter.options import Options
from converter.report import TRAINING_NOTE, LayerRecord
from converter.shapes import ValueInfo


@dataclass
class Rewrite:
    model: ModelProto
    layers: list[LayerRecord]

    @property
    def training(self) -> int:
        """BatchNorms that were in training mode and were switched to inference mode."""
        return sum(1 for r in self.layers if r.training)


def rewrite(model: ModelProto, options: Options) -> Rewrite:
    """Apply the conversion to ``model`` in place (fp16 returns a new model). No verification."""
    g = Graph(model)
    shapes = options.input_shapes if isinstance(options.input_shapes, Mapping) else None
    info = ValueInfo(model, shapes)
    declared = info if shapes is None else ValueInfo(model)  # Shape/Size fold only on the model's own static dims
    g.static_shape, g.elem_type = declared.shape, declared.elem_type
    g.settle_metadata_reads()
    cast = readiness.Recorder(precision.fp16_cast if options.fp16 else cast_exact)
    layers = _rewrite_bodies(g, info, cast, options)
    if layers:
        g.reindex()  # the bodies changed what they read from this graph
    layers.update(_rewrite_graph(g, info, cast, options))
    g.prune()
    g.commit()
    _drop_stale_value_info(model)
    if options.fp16:
        precision.check_range(g)
        model = precision.to_fp16(model, keep_io_types=not options.fp16_io)
    return Rewrite(model, list(layers.values()))


def _rewrite_graph(
    g: Graph, info: ValueInfo, cast: readiness.Recorder, options: Options, prefix: str = ""
) -> dict[str, LayerRecord]:
    """Normalise, fold and keep (or make affine) the BatchNorms of one graph; records named ``prefix + name``."""
    layers: dict[str, LayerRecord] = {}
    for bn in bn_modes.find(g):
        record = LayerRecord(bn.name, "BatchNormalization", "kept", output=bn.output)
        if bn.training:
            record.notes.append(TRAINING_NOTE)
            record.training = True
        _variance(g, bn, record)
        bn_modes.normalise(g, bn)
        layers[bn.name] = record
    if options.bn in ("fold", "affine"):
        _fold_all(g, info, cast, layers)
    for idx, node in list(g.live_nodes()):
        if not bn_modes.is_batchnorm(node):
            continue
        bn = bn_modes.parse(g, idx)
        record = layers[bn.name]
        if options.bn == "keep":
            record.reason = "as asked (bn=keep)"
        elif options.bn == "affine":
            why_not = bn_modes.to_affine(g, bn, info, cast.inner)
            if why_not is None:
                record.action, record.reason = "affine", None
            else:
                record.reason = why_not
    if not prefix:
        return layers
    return {prefix + name: replace(record, name=prefix + record.name) for name, record in layers.items()}


def _rewrite_bodies(g: Graph, info: ValueInfo, cast: readiness.Recorder, options: Options) -> dict[str, LayerRecord]:
    """The same rewrite inside every If/Loop/Scan body of ``g`` (innermost first), each body folded on its own:
    a fold never crosses a body's border. Records are named ``node/attribute/BN``."""
    layers: dict[str, LayerRecord] = {}
    for _, node in list(g.live_nodes()):
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                body = Graph(g.model, sub, outer=g)
                body.static_shape, body.elem_type = g.static_shape, g.elem_type
                body.settle_metadata_reads()
                prefix = f"{display_name(node)}/{attr.name}/"
                inner = _rewrite_bodies(body, info, cast, options)
                if inner:
                    body.reindex()
                layers.update({prefix + k: replace(r, name=prefix + r.name) for k, r in inner.items()})
                layers.update(_rewrite_graph(body, info, cast, options, prefix))
                body.prune()
                body.commit()
    return layers


def _variance(g: Graph, bn: bn_modes.BatchNormNode, record: LayerRecord) -> None:
    """Count the channels whose running variance is at most ε (the fold then scales by up to γ/sqrt(ε))."""
    node = bn.node
    var = g.constant(node.input[4]) if len(node.input) > 4 else None
    if var is None or not np.issubdtype(np.asarray(var).dtype, np.floating):
        return
    eps = float(attribute(node, "epsilon", DEFAULT_EPSILON))  # type: ignore[arg-type]
    v = np.asarray(var, np.float64).reshape(-1)
    record.channels = int(v.size)
    record.near_zero_variance = int(np.count_nonzero(np.abs(v) <= eps))


def _fold_all(g: Graph, info: ValueInfo, cast: readiness.Recorder, layers: dict[str, LayerRecord]) -> None:
    """Fold until nothing changes (a fold can make another possible: Conv → BN → BN)."""
    changed = True
    while changed:
        changed = False
        for idx, node in list(g.live_nodes()):
            if idx in g.removed:
                continue
            if bn_modes.is_batchnorm(node):
                bn = bn_modes.parse(g, idx)
                record = layers[bn.name]
                if bn.s is None or bn.t is None:
                    record.reason = bn.not_constant
                    continue
                affine = rules.Affine((idx,), bn.input, bn.output, bn.s, bn.t, bn.name)
                found = rules.match(g, affine, info)
                if isinstance(found, rules.Skip):
                    record.reason = found.reason
                    continue
            elif node.op_type in rules.CHAIN_PRODUCERS:
                chain = rules.chain_after(g, idx)
                if chain is None:
                    continue
                found = rules.match(g, chain, info)
                if isinstance(found, rules.Skip):
                    continue
                name = display_name(g.node(chain.nodes[0]))
                kind = "+".join(g.node(i).op_type for i in chain.nodes)
                record = layers.setdefault(name, LayerRecord(name, kind, "kept", output=chain.output))
            else:
                continue
            producer = g.node(found.producer)
            record.folded_into(producer.op_type, display_name(producer))
            record.into, record.fold = found.into, found.kind
            # a Concat split writes one weight per part: its readiness figures are not one layer's
            before = None if found.weight is None else np.asarray(found.weight)
            cast.take()
            found.apply(g, cast)
            weight, bias = cast.take()
            if weight is not None and before is not None:
                record.weights = readiness.weight_stats(producer, weight, bias, before)
            changed = True


def _drop_stale_value_info(model: ModelProto) -> None:
    """Remove value_info entries of values that no longer exist (a producer's renamed output), in every graph."""
    for g in all_graphs(model.graph):
        alive = {o for n in g.node for o in n.output} | {i.name for i in g.input}
        stale = [vi for vi in g.value_info if vi.name not in alive]
        for vi in stale:
            g.value_info.remove(vi)
