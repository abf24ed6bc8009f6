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
FP16_MAX = float(np.finfo(np.float16).max)

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


_CHUNK = 1 << 20  # elements per pass: full-size temporaries of a large weight cost more in page faults than work


#: float16 rounding (to nearest, ties to even) in thresholds on the magnitude: ≥ 65520 becomes infinity,
#: ≤ 2⁻²⁵ becomes zero, below 2⁻¹⁴ − 2⁻²⁵ (half a subnormal step under the smallest normal) stays subnormal.
FP16_OVERFLOW_AT = 65520.0
FP16_ZERO_AT = 2.0**-25
FP16_NORMAL_AT = 2.0**-14 - 2.0**-25


def fp16_counts(values: Array) -> tuple[int, int, int]:
    """(overflow, subnormal, flushed to zero) of ``values`` once rounded to float16.

    Counted with thresholds on the float32 magnitude, a chunk at a time: a float64 → float16 cast, or full-size
    temporaries, of a ResNet-50's 25 M folded weights cost seconds. float32 first is what a later float16
    conversion of the written (float32) model does too.
    """
    flat = np.ascontiguousarray(values).ravel()
    overflow = subnormal = zero = 0
    buffer = np.empty(min(flat.size, _CHUNK), dtype=np.float32)
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK]
        mag = buffer[: chunk.size]
        with np.errstate(over="ignore", invalid="ignore"):
            np.abs(chunk, out=mag, casting="unsafe")
        if float(np.nanmax(mag)) >= FP16_OVERFLOW_AT:
            overflow += int(np.count_nonzero((mag >= FP16_OVERFLOW_AT) & np.isfinite(mag)))
            if flat.dtype.itemsize > 4:  # finite in float64, infinite once in float32: overflows all the same
                overflow += int(np.count_nonzero(np.isinf(mag) & np.isfinite(chunk)))
        tiny = int(np.count_nonzero(mag <= FP16_ZERO_AT))
        zeros = int(np.count_nonzero(mag == 0))
        zero += tiny - zeros
        subnormal += int(np.count_nonzero(mag < FP16_NORMAL_AT)) - tiny
    return overflow, subnormal, zero


def channel_rows(weight: Array, node: NodeProto) -> Array:
    """``weight`` as one row per output channel of ``node`` (a view where the layout allows): Conv axis 0;
    ConvTranspose axis 1 within each group; Gemm axis 0 of B with transB=1, else axis 1; MatMul the last axis.
    A weight of rank < 2 is one channel per element."""
    w = np.asarray(weight)
    if w.ndim < 2:
        return w.reshape(-1, 1)
    op = node.op_type
    if op == "ConvTranspose":
        groups = int(attribute(node, "group", 1))  # type: ignore[call-overload]
        if groups < 1 or w.shape[0] % groups:
            groups = 1
        w = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])  # (g, C_in/g, C_out/g, k…)
        w = np.moveaxis(w, 2, 1)  # (g, C_out/g, C_in/g, k…)
        return w.reshape(groups * w.shape[1], -1)
    if op == "Gemm":
        axis = 0 if int(attribute(node, "transB", 0)) else 1  # type: ignore[call-overload]
    elif op == "MatMul":
        axis = w.ndim - 1
    else:
        axis = 0
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def channel_max(weight: Array, node: NodeProto) -> Array:
    """max|W_c| per output channel of ``node`` (the channels of :func:`channel_rows`)."""
    rows = channel_rows(weight, node)
    result: Array = np.maximum(rows.max(axis=1), -rows.min(axis=1))
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
    """Statistics of one fold's W′ (float64, as computed) and b′, and the spread of W before it."""
    counts = np.add(fp16_counts(weight), fp16_counts(bias) if bias is not None else (0, 0, 0))
    per_channel = channel_max(weight, node)
    return WeightStats(
        max_weight=float(per_channel.max()) if per_channel.size else 0.0,
        max_bias=float(np.abs(bias).max()) if bias is not None and bias.size else 0.0,
        channel_spread=spread(per_channel),
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
