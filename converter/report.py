"""What a conversion did to each BatchNorm (and Mul/Add chain), and why; how it was verified; how ready the
folded weights are for float16 and INT8. As text (short) or JSON (every number)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto

from converter.affine import FoldKind
from converter.graph import all_graphs
from converter.quant_report import Int8Report
from converter.readiness import WeightStats
from converter.trace import Trace
from converter.verify import Verification

TRAINING_NOTE = "was in training mode (batch statistics); converted to inference mode (running statistics)"


@dataclass
class LayerRecord:
    """One BatchNormalization (or Mul/Add chain) of the model and what became of it."""

    name: str
    kind: str  # "BatchNormalization", "Mul+Add", "Mul", "Add"
    action: str  # "folded", "kept", "affine"
    into: str | None = None  # "Conv conv1" for a fold
    reason: str | None = None  # why it was not folded
    fold: FoldKind | None = None  # which rule folded it (backward, forward, concat split, through shape op)
    notes: list[str] = field(default_factory=list)
    output: str | None = None  # the tensor it writes (in the original graph)
    into_op: str | None = None  # the node it was folded into: op type and node name
    into_node: str | None = None
    training: bool = False  # was in training mode and was switched to inference mode
    weights: WeightStats | None = None  # the folded W′ and b′ (a fold only)
    near_zero_variance: int = 0  # channels whose running variance is at most ε
    channels: int = 0

    def folded_into(self, op_type: str, node: str) -> None:
        self.action, self.reason = "folded", None
        self.into_op, self.into_node, self.into = op_type, node, f"{op_type} {node}"


@dataclass
class Counts:
    nodes: int
    parameters: int
    batchnorms: int

    @classmethod
    def of(cls, model: ModelProto) -> Counts:
        """Nodes, parameters (initializers and Constant values) and BatchNorms; If/Loop/Scan bodies count too
        (nodes: the main graph's)."""
        params = bns = 0
        for graph in all_graphs(model.graph):
            params += sum(int(np.prod(t.dims, dtype=np.int64)) for t in graph.initializer)
            for node in graph.node:
                bns += node.op_type == "BatchNormalization"
                if node.op_type == "Constant":
                    for attr in node.attribute:
                        if attr.name == "value":
                            params += int(np.prod(attr.t.dims, dtype=np.int64))
        return cls(nodes=len(model.graph.node), parameters=params, batchnorms=bns)


@dataclass
class Readiness:
    """Deployment readiness over every fold; ``warnings`` are the lines the text report shows."""

    fp16: bool  # the model was converted to float16 (else the float16 counts are a forecast)
    max_weight: float = 0.0
    max_weight_layer: str | None = None
    max_bias: float = 0.0
    max_bias_layer: str | None = None
    widest_spread: float | None = None
    widest_spread_layer: str | None = None
    fp16_overflow: int = 0
    fp16_subnormal: int = 0
    fp16_zero: int = 0
    near_zero_variance: dict[str, int] = field(default_factory=dict)  # BN name -> channels with var ≤ ε
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, layers: list[LayerRecord], fp16: bool) -> Readiness:
        r = cls(fp16=fp16)
        for layer in layers:
            if layer.near_zero_variance:
                r.near_zero_variance[layer.name] = layer.near_zero_variance
            w = layer.weights
            if w is None:
                continue
            if w.max_weight >= r.max_weight:
                r.max_weight, r.max_weight_layer = w.max_weight, layer.name
            if w.max_bias >= r.max_bias:
                r.max_bias, r.max_bias_layer = w.max_bias, layer.name
            if w.channel_spread is not None and (r.widest_spread is None or w.channel_spread > r.widest_spread):
                r.widest_spread, r.widest_spread_layer = w.channel_spread, layer.name
            r.fp16_overflow += w.fp16_overflow
            r.fp16_subnormal += w.fp16_subnormal
            r.fp16_zero += w.fp16_zero
        if r.fp16_overflow + r.fp16_subnormal + r.fp16_zero:
            where = ", ".join(
                x.name
                for x in layers
                if x.weights is not None and x.weights.fp16_overflow + x.weights.fp16_subnormal + x.weights.fp16_zero
            )
            prefix = "float16" if fp16 else "float16 (if converted later)"
            r.warnings.append(
                f"{prefix}: folded values that overflow {r.fp16_overflow}, become subnormal {r.fp16_subnormal}, "
                f"flush to zero {r.fp16_zero} ({where})"
            )
        if r.near_zero_variance:
            parts = ", ".join(f"{n} {c}" for n, c in r.near_zero_variance.items())
            r.warnings.append(f"BN channels with running variance <= epsilon (dead channels?): {parts}")
        return r

    def lines(self) -> list[str]:
        if self.max_weight_layer is None and not self.warnings:
            return []
        parts = []
        if self.max_weight_layer is not None:
            parts.append(f"max|W'| {self.max_weight:.3g} ({self.max_weight_layer})")
            parts.append(f"max|b'| {self.max_bias:.3g} ({self.max_bias_layer})")
        if self.widest_spread is not None:
            parts.append(f"widest channel spread {self.widest_spread:.3g}x ({self.widest_spread_layer})")
        out = [f"readiness: {', '.join(parts)}"] if parts else []
        out.extend(f"  warning: {w}" for w in self.warnings)
        return out


@dataclass
class Report:
    bn_mode: str
    fp16: bool = False
    source: str | None = None
    output: str | None = None
    layers: list[LayerRecord] = field(default_factory=list)
    before: Counts | None = None
    after: Counts | None = None
    verification: Verification | None = None
    # further comparisons of the converted model: on real samples, against other references (PyTorch eval)
    extra_verifications: list[Verification] = field(default_factory=list)
    trace: Trace | None = None  # where the converted graph first departs from the original (on failure, --trace)
    readiness: Readiness | None = None
    int8: Int8Report | None = None  # the INT8 quantization after the fold, and its proof
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    initializer_inputs: list[str] = field(default_factory=list)  # listed as graph inputs too; read as constants

    @property
    def folded(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.action == "folded"]

    @property
    def kept(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.action != "folded"]

    @property
    def verifications(self) -> list[Verification]:
        return ([self.verification] if self.verification is not None else []) + self.extra_verifications

    @property
    def training(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.training]

    def add_verifications(self, checks: list[Verification]) -> None:
        for check in checks:
            if self.verification is None:
                self.verification = check
            else:
                self.extra_verifications.append(check)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON: a non-finite error (a shape mismatch, say) is written as the string "inf"."""
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False) + "\n"

    def to_text(self) -> str:
        lines = []
        src = self.source or "<model>"
        dst = f" -> {self.output}" if self.output else ""
        lines.append(f"bnfold: {src}{dst}  (--bn {self.bn_mode}{', fp16' if self.fp16 else ''})")
        if self.layers:
            width = max(len(r.name) for r in self.layers)
            for r in self.layers:
                what = f"into {r.into}" if r.into else (r.reason or "")
                if r.fold not in (None, FoldKind.BACKWARD):  # a plain "into X" is the backward fold
                    what += f" [{r.fold}]"
                kind = "" if r.kind == "BatchNormalization" else f" [{r.kind}]"
                lines.append(f"  {r.name:<{width}}  {r.action:<7} {what}{kind}")
                lines.extend(f"  {'':<{width}}  note: {n}" for n in r.notes)
        else:
            lines.append("  no BatchNormalization found")
        if self.before and self.after:
            b, a = self.before, self.after
            lines.append(
                f"nodes {b.nodes} -> {a.nodes}, parameters {b.parameters:,} -> {a.parameters:,}, "
                f"BatchNormalization {b.batchnorms} -> {a.batchnorms}"
            )
        if self.readiness is not None:
            lines.extend(self.readiness.lines())
        for v in self.verifications:
            lines.extend(_verification_lines(v))
        if self.trace is not None:
            lines.extend(self.trace.lines())
        if self.int8 is not None:
            lines.extend(self.int8.lines())
        lines.extend(f"note: {n}" for n in self.notes)
        if self.seconds:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
            lines.append(f"time: {parts}")
        return "\n".join(lines) + "\n"


def _verification_lines(v: Verification) -> list[str]:
    verdict = "passed" if v.passed else "FAILED"
    if v.framework:
        how = "converted model in ONNX Runtime, optimisations off"
    else:
        how = f"ONNX Runtime, optimisations off, {v.inputs_from}"
    lines = [f"verification {verdict} against {v.reference} ({how}, pass: max|Δ| <= {v.atol:g} + {v.rtol:g}·max|ref|)"]
    for o in v.outputs:
        flag = "ok" if o.passed else "FAIL"
        extra = f"  ({o.detail})" if o.detail else ""
        agree = ""
        if o.top1 is not None and o.topk is not None:
            agree = f", top-1 agreement {o.top1:.1%}, top-{o.k} overlap {o.topk:.1%}"
        lines.append(f"  {o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}{agree}  {flag}{extra}")
    return lines


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
