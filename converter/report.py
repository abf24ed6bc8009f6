"""What a conversion did to each BatchNorm (and Mul/Add chain), and why; as text or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto

from converter.affine import FoldKind
from converter.verify import Verification


@dataclass
class LayerRecord:
    name: str
    kind: str  # "BatchNormalization", "Mul+Add", "Mul", "Add"
    action: str  # "folded", "kept", "affine"
    into: str | None = None  # "Conv conv1" for a fold
    reason: str | None = None  # why it was not folded
    fold: FoldKind | None = None  # which rule folded it (backward, forward, concat split, through shape op)
    notes: list[str] = field(default_factory=list)


@dataclass
class Counts:
    nodes: int
    parameters: int
    batchnorms: int

    @classmethod
    def of(cls, model: ModelProto) -> Counts:
        params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
        for node in model.graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        params += int(np.prod(attr.t.dims, dtype=np.int64))
        bns = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
        return cls(nodes=len(model.graph.node), parameters=params, batchnorms=bns)


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
    # further comparisons of the converted model, against other references (PyTorch eval outputs)
    extra_verifications: list[Verification] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def folded(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.action == "folded"]

    @property
    def kept(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.action != "folded"]

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
        if self.verification is not None:
            v = self.verification
            lines.extend(_verification_lines(v, f"ONNX Runtime, optimisations off, seed {v.seed}"))
        for v in self.extra_verifications:
            lines.extend(_verification_lines(v, "converted model in ONNX Runtime, optimisations off"))
        lines.extend(f"note: {n}" for n in self.notes)
        if self.seconds:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
            lines.append(f"time: {parts}")
        return "\n".join(lines) + "\n"


def _verification_lines(v: Verification, how: str) -> list[str]:
    verdict = "passed" if v.passed else "FAILED"
    lines = [f"verification {verdict} against {v.reference} ({how}, pass: max|Δ| <= {v.atol:g} + {v.rtol:g}·max|ref|)"]
    for o in v.outputs:
        flag = "ok" if o.passed else "FAIL"
        extra = f"  ({o.detail})" if o.detail else ""
        lines.append(f"  {o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}  {flag}{extra}")
    return lines


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
