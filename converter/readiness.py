"""Deployment readiness of folded weights: their range, what float16 does to them, per-channel spread.

Folding multiplies a layer's weights by ``s = γ/sqrt(var + ε)``, so a BN channel with a near-zero running
variance can make its weights large: fine in float32, but values beyond 65504 overflow float16, values below
2⁻¹⁴ become subnormal there (slow on some hardware, imprecise), and those below 2⁻²⁵ flush to zero. The
per-channel range spread of W′ (max over output channels of ``max|W′_c|``, divided by its median) is what a
per-tensor INT8 scale has to cover; folding can widen it.

Statistics are taken from the float64 values a fold computes, before they are cast to the weight's dtype:
:class:`Recorder` wraps the cast that the fold rules call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import NodeProto

from converter.graph import attribute
from converter.shapes import Cast

FP16_MIN_NORMAL = 2.0**-14

Array = NDArray[Any]


@dataclass
class WeightStats:
    """The tensors one fold wrote (W′ and b′)."""

    max_weight: float
    max_bias: float
    channel_spread: float | None  # max over output channels of max|W′_c| / its median; None for one channel
    channel_spread_before: float | None  # the same for W before the fold
    fp16_overflow: int  # values of W′ and b′ beyond float16's range
    fp16_subnormal: int  # values that are subnormal in float16
    fp16_zero: int  # non-zero values that round to zero in float16


def fp16_counts(values: Array) -> tuple[int, int, int]:
    """(overflow, subnormal, flushed to zero) of ``values`` once rounded to float16."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    with np.errstate(over="ignore"):
        h = v.astype(np.float16)
    overflow = int(np.count_nonzero(np.isinf(h)))
    mag = np.abs(h.astype(np.float64))
    subnormal = int(np.count_nonzero((mag > 0) & (mag < FP16_MIN_NORMAL)))
    zero = int(np.count_nonzero((h == 0) & (v != 0)))
    return overflow, subnormal, zero


def channel_max(weight: Array, node: NodeProto) -> Array:
    """max|W_c| per output channel of ``node`` (Conv axis 0; ConvTranspose axis 1 within each group; Gemm
    axis 0 of B with transB=1, else axis 1; MatMul the last axis)."""
    w = np.abs(np.asarray(weight, np.float64))
    if w.ndim < 2:
        return w.reshape(-1)
    op = node.op_type
    if op == "ConvTranspose":
        groups = int(attribute(node, "group", 1))  # type: ignore[call-overload]
        if groups < 1 or w.shape[0] % groups:
            groups = 1
        w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])  # (g, C_in/g, C_out/g, k…)
        w = np.moveaxis(w, 2, 1).reshape(groups * w.shape[2], -1)  # (g·C_out/g, …)
        per_channel: Array = w.max(axis=1)
        return per_channel
    if op == "Gemm":
        axis = 0 if int(attribute(node, "transB", 0)) else 1  # type: ignore[call-overload]
    elif op == "MatMul":
        axis = w.ndim - 1
    else:
        axis = 0
    result: Array = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).max(axis=1)
    return result


def spread(per_channel: Array) -> float | None:
    if per_channel.size < 2:
        return None
    median = float(np.median(per_channel))
    top = float(per_channel.max())
    if median > 0:
        return top / median
    return math.inf if top > 0 else 1.0


def weight_stats(node: NodeProto, weight: Array, bias: Array | None, before: Array | None) -> WeightStats:
    counts = np.array(fp16_counts(weight)) + (np.array(fp16_counts(bias)) if bias is not None else 0)
    finite_w = np.abs(weight[np.isfinite(weight)])
    finite_b = np.abs(bias[np.isfinite(bias)]) if bias is not None else np.zeros(0)
    return WeightStats(
        max_weight=float(finite_w.max()) if finite_w.size else 0.0,
        max_bias=float(finite_b.max()) if finite_b.size else 0.0,
        channel_spread=spread(channel_max(weight, node)),
        channel_spread_before=spread(channel_max(before, node)) if before is not None else None,
        fp16_overflow=int(counts[0]),
        fp16_subnormal=int(counts[1]),
        fp16_zero=int(counts[2]),
    )


class Recorder:
    """A :data:`~converter.shapes.Cast` that remembers the float64 tensors it casts, then casts with ``inner``."""

    def __init__(self, inner: Cast) -> None:
        self.inner = inner
        self.seen: list[Array] = []

    def __call__(self, value: NDArray[np.float64], dtype: Any, what: str) -> NDArray[np.floating]:
        self.seen.append(np.asarray(value, np.float64))
        return self.inner(value, dtype, what)

    def take(self) -> tuple[Array | None, Array | None]:
        """(W′, b′) of the last fold: the first tensor of rank ≥ 2 and the first of rank 1; then forget."""
        weight = next((v for v in self.seen if v.ndim >= 2), None)
        bias = next((v for v in self.seen if v.ndim <= 1), None)
        self.seen = []
        return weight, bias
