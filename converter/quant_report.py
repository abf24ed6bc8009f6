"""What INT8 quantization did, for the conversion report: how the quantized model compares with the float one
on held-out samples (per output), and what each fold did to the weight ranges quantization has to cover.

Output quality, per output over every verification sample (the float model's outputs are the reference):

- ``max_abs``: the largest absolute difference;
- ``snr_db``: ``10·log10(Σ ref² / Σ (int8 − ref)²)``: 20 dB means the error's power is 1% of the output's;
- for class scores (2-D float outputs with at least 2 columns): top-1 agreement (the fraction of samples whose
  largest score is the same class) and the mean overlap of the top-k classes, k = min(5, classes − 1).

Weights, per layer a fold wrote into: the range ``max|W_c|`` of every output channel c before and after the
fold(s), their spread (largest over median), and the INT8 error of the layer's weights as the signal-to-noise
ratio of its worst output channel: symmetric int8 with one scale for the whole tensor (before and after the
fold) and with one scale per output channel (after; what bnfold's quantization uses). Folding multiplies
channel c by ``γ_c/sqrt(var_c+ε)``: channels scaled unevenly widen the spread, which a per-tensor scale pays
for in the small channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, NodeProto

from converter.graph import Graph, display_name
from converter.readiness import channel_rows, spread
from converter.verify import class_agreement

Array = NDArray[Any]
RANDOM_WARNING = (
    "WARNING: calibrated and verified on seeded RANDOM inputs (random calibration): the INT8 ranges and "
    "these figures say nothing about real data; for smoke tests only"
)


@dataclass
class OutputQuality:
    """One output of the quantized model against the float model, over every verification sample."""

    name: str
    max_abs: float
    snr_db: float
    passed: bool
    criterion: str  # what it had to meet: "top-1 agreement >= 99%" or "SNR >= 20 dB"
    top1: float | None = None
    topk: float | None = None
    k: int | None = None
    nonfinite: int = 0  # NaN/Inf in the quantized model's outputs (a failure)


@dataclass
class LayerRange:
    """One layer that folds wrote into: its weight ranges per output channel and INT8 errors."""

    layer: str  # "Conv conv0"
    folded: list[str]  # the BatchNorms (or Mul/Add chains) folded into it
    channels: int
    before: list[float]  # max|W_c| per output channel, before the fold
    after: list[float]  # ... after
    spread_before: float | None
    spread_after: float | None
    snr_tensor_before_db: float  # worst channel's SNR, int8 with one scale for the tensor, before the fold
    snr_tensor_db: float  # ... after
    snr_channel_db: float  # worst channel's SNR, int8 with one scale per output channel, after the fold


@dataclass
class Int8Report:
    """How the model was quantized and how the result compares with the float model."""

    activations: str
    calibration: str
    calibrated_on: str  # "80 samples from digits.npz"
    calibration_samples: int
    verified_on: str | None = None  # None: not verified (verify=False)
    verification_samples: int = 0
    random: bool = False  # calibrated on random inputs (smoke tests only)
    format: str = "QDQ"
    weights: str = "int8, symmetric, one scale per output channel"
    min_top1: float = 0.0
    min_snr_db: float = 0.0
    passed: bool | None = None
    outputs: list[OutputQuality] = field(default_factory=list)
    layers: list[LayerRange] = field(default_factory=list)
    bytes_float: int = 0
    bytes_int8: int = 0
    notes: list[str] = field(default_factory=list)

    def failures(self) -> str:
        """The failing outputs in one line: ``logits top-1 agreement 97.0% < 99%``."""
        parts = []
        for o in self.outputs:
            if o.passed:
                continue
            if o.nonfinite:
                parts.append(f"{o.name} has {o.nonfinite} NaN/Inf values")
            elif o.top1 is not None:
                parts.append(f"{o.name} top-1 agreement {o.top1:.1%} < {_pct(self.min_top1)}")
            else:
                parts.append(f"{o.name} SNR {o.snr_db:.1f} dB < {self.min_snr_db:g} dB")
        return ", ".join(parts)

    def lines(self) -> list[str]:
        out = []
        if self.random:
            out.append(RANDOM_WARNING)
        out.append(
            f"int8: {self.format}, activations {self.activations}, weights {self.weights}; calibrated "
            f"({self.calibration}) on {self.calibrated_on}; size {_kb(self.bytes_float)} -> {_kb(self.bytes_int8)}"
        )
        if self.verified_on is None:
            out.append("int8 verification skipped: the quantized model was not compared with the float model")
        else:
            verdict = "passed" if self.passed else "FAILED"
            out.append(f"int8 verification {verdict} against the float model on {self.verified_on}")
        for o in self.outputs:
            agree = ""
            if o.top1 is not None:
                agree = f"top-1 agreement {o.top1:.1%}, top-{o.k} overlap {o.topk:.1%}, "
            flag = "ok" if o.passed else "FAIL"
            bad = f", {o.nonfinite} NaN/Inf" if o.nonfinite else ""
            out.append(
                f"  {o.name}: {agree}SNR {o.snr_db:.1f} dB, max abs {o.max_abs:.3g}{bad}  ({o.criterion}) {flag}"
            )
        if self.layers:
            out.append(
                "int8 weights by folded layer: max|W_c| over channels before -> after the fold (spread = max/median); "
                "worst channel's INT8 weight SNR per-tensor before -> after, per-channel after"
            )
            width = max(len(r.layer) for r in self.layers)
            for r in self.layers:
                out.append(
                    f"  {r.layer:<{width}}  {r.channels:>4} ch  {_range(r.before)} -> {_range(r.after)}  "
                    f"spread {_x(r.spread_before)} -> {_x(r.spread_after)}  "
                    f"per-tensor {_db(r.snr_tensor_before_db)} -> {_db(r.snr_tensor_db)}, "
                    f"per-channel {_db(r.snr_channel_db)}"
                )
        out.extend(f"int8 note: {n}" for n in self.notes)
        if self.random:
            out.append(RANDOM_WARNING)
        return out


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _kb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _range(values: Sequence[float]) -> str:
    return f"[{min(values):.3g}, {max(values):.3g}]" if values else "[]"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}x"


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else ("exact" if value > 0 else "-inf dB")


# ------------------------------------------------------------------------------------------------------------
# output quality


def snr_db(got: Array, want: Array) -> float:
    """``10·log10(Σ want² / Σ (got − want)²)`` in float64; +inf when equal."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    noise = float(np.sum((g - w) ** 2))
    signal = float(np.sum(w**2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def output_quality(
    name: str, got: Sequence[Array], want: Sequence[Array], min_top1: float, min_snr_db: float
) -> OutputQuality:
    """One output over every run (one array per sample): the figures of the module docstring and the verdict
    (class scores by top-1 agreement, other outputs by SNR)."""
    g = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in got])
    w = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in want])
    if g.shape != w.shape:
        return OutputQuality(name, math.inf, -math.inf, False, "same shape as the float model's")
    nonfinite = int(g.size - np.count_nonzero(np.isfinite(g)))
    both = np.isfinite(g) & np.isfinite(w)
    max_abs = float(np.abs(g[both] - w[both]).max()) if np.any(both) else 0.0
    snr = snr_db(g[both], w[both])
    agreement = class_agreement(list(got), list(want))
    if agreement is not None:
        top1, topk, k = agreement
        check = OutputQuality(
            name, max_abs, snr, top1 >= min_top1, f"top-1 agreement >= {_pct(min_top1)}", top1, topk, k
        )
    else:
        check = OutputQuality(name, max_abs, snr, snr >= min_snr_db, f"SNR >= {min_snr_db:g} dB")
    check.nonfinite = nonfinite
    check.passed = check.passed and not nonfinite
    return check


# ------------------------------------------------------------------------------------------------------------
# weight ranges


def int8_snr_db(rows: Array, per_channel: bool) -> float:
    """The worst output channel's SNR after symmetric int8 rounding of ``rows`` (one row per output channel),
    scale max|·|/127 per row or for the whole tensor. The worst channel, not the tensor as a whole: a channel
    a fold scaled up dominates the tensor's power and would hide what one scale does to the small ones."""
    w = np.asarray(rows, np.float64)
    top = np.abs(w).max(axis=1, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(top > 0, top / 127.0, 1.0)
    noise = np.sum((np.clip(np.round(w / scale), -127, 127) * scale - w) ** 2, axis=1)
    signal = np.sum(w**2, axis=1)
    with np.errstate(divide="ignore"):
        per_row = 10.0 * np.log10(signal / noise)  # +inf for a row rounded exactly (all zeros included)
    return float(per_row.min()) if per_row.size else math.inf


def layer_ranges(original: ModelProto, folded: ModelProto, folds: Sequence[tuple[str, str]]) -> list[LayerRange]:
    """One :class:`LayerRange` per layer that the ``folds`` (``(BN name, layer node name)`` pairs) wrote into,
    in graph order, comparing its weight (input 1: Conv, ConvTranspose, Gemm, MatMul) in both models. A layer
    missing from either model, or whose weight is not a constant of the same shape in both, is left out."""
    into: dict[str, list[str]] = {}
    for bn, node in folds:
        into.setdefault(node, []).append(bn)
    before_g, after_g = Graph(original), Graph(folded)
    before_nodes = {display_name(n): n for n in original.graph.node}
    out = []
    for node in folded.graph.node:
        name = display_name(node)
        old = before_nodes.get(name)
        if name not in into or old is None or len(node.input) < 2 or len(old.input) < 2:
            continue
        w_before, w_after = before_g.constant(old.input[1]), after_g.constant(node.input[1])
        if w_before is None or w_after is None or np.shape(w_before) != np.shape(w_after):
            continue
        out.append(_layer_range(node, into[name], w_before, w_after))
    return out


def _layer_range(node: NodeProto, folded: list[str], before: Array, after: Array) -> LayerRange:
    rows_before = channel_rows(np.asarray(before, np.float64), node)
    rows_after = channel_rows(np.asarray(after, np.float64), node)
    max_before, max_after = np.abs(rows_before).max(axis=1), np.abs(rows_after).max(axis=1)
    return LayerRange(
        layer=f"{node.op_type} {display_name(node)}",
        folded=folded,
        channels=int(rows_after.shape[0]),
        before=[float(v) for v in max_before],
        after=[float(v) for v in max_after],
        spread_before=spread(max_before),
        spread_after=spread(max_after),
        snr_tensor_before_db=int8_snr_db(rows_before, per_channel=False),
        snr_tensor_db=int8_snr_db(rows_after, per_channel=False),
        snr_channel_db=int8_snr_db(rows_after, per_channel=True),
    )
