"""The folding arithmetic, in float64, one function per producer kind. No ONNX here: arrays in, arrays out.

A test-mode BatchNorm is the per-channel affine map ``y = s·x + t`` with::

    s = γ / sqrt(var + ε),   t = β − μ·s

Folding it into the producer of ``x`` (per output channel c)::

    W'[c] = s[c]·W[c],   b'[c] = s[c]·b[c] + t[c]  ( = s[c]·(b[c] − μ[c]) + β[c] ),  b = 0 without bias

Where the output channel sits in each producer's weight:

- Conv: axis 0 of ``W (C_out, C_in/groups, k...)``.
- ConvTranspose: axis 1 within each group: ``W (C_in, C_out/groups, k...)``; output channel
  ``g·(C_out/groups) + j`` comes from ``W[g·C_in/groups : (g+1)·C_in/groups, j]``.
- Gemm ``Y = alpha·A'·B' + beta·C``: axis 1 of ``B'`` (axis 0 of B when transB=1, axis 1 when transB=0);
  alpha and beta are folded into the new B and C, which are then used with alpha = beta = 1.
- MatMul ``Y = X·W`` (+ bias): the last axis of W.

Forward folding: a map whose only reader is a linear layer ``L`` gives ``L(s·x + t)``; per *input* channel i the
scale goes into L's weight and the shift, pushed through the weight, into L's bias:

- Conv ``W (C_out, C_in/groups, k...)``, no zero padding: ``W'[o, j] = W[o, j]·s[i]``,
  ``b'[o] = b[o] + Σ_{j,k} W[o, j, k]·t[i]`` with ``i = group(o)·C_in/groups + j``. Every output position sums
  every tap over real input, so the shift's contribution is the same everywhere; a zero-padded border would see
  ``0`` instead of ``t``.
- ConvTranspose ``W (C_in, C_out/groups, k...)``: ``W'[i] = W[i]·s[i]`` and the bias as for Conv, exact only for
  a 1×1 kernel with stride 1 (with a larger kernel or stride, output positions receive different numbers of taps).
- Gemm ``Y = alpha·A·B' + beta·C`` with the map on A (transA=0): B' scaled along its contracted axis,
  ``C' = beta·C + alpha·(t·B')``; MatMul ``X·W``: ``W'[k] = s[k]·W[k]``, bias ``t·W``.

Everything is computed in float64; :func:`cast_exact` casts once to the stored dtype and refuses overflow.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from converter.errors import ConversionError

F64 = NDArray[np.float64]

#: Floating dtypes whose parameters can be folded (the ONNX types numpy represents exactly).
FOLDABLE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def bn_affine(gamma: F64, beta: F64, mean: F64, var: F64, eps: float, layer: str) -> tuple[F64, F64]:
    """The test-mode BatchNorm as ``(s, t)`` with ``y = s·x + t``; refuses parameters that give inf or NaN."""
    g, b, m, v = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (gamma, beta, mean, var))
    if not (g.size == b.size == m.size == v.size):
        raise ConversionError(
            f"{layer}: BatchNormalization parameters have different lengths "
            f"(scale {g.size}, B {b.size}, mean {m.size}, var {v.size})"
        )
    denom = v + float(eps)
    if not np.all(denom > 0):
        c = int(np.argmin(denom))
        raise ConversionError(
            f"{layer}: running variance + epsilon is {denom[c]!r} at channel {c}; it must be positive"
        )
    s = g / np.sqrt(denom)
    t = b - m * s
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        raise ConversionError(f"{layer}: BatchNormalization parameters are not finite")
    return s, t


def _per_axis(s: F64, ndim: int, axis: int) -> F64:
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape)


def _bias(b: NDArray[np.floating] | None, channels: int) -> F64:
    return np.zeros(channels) if b is None else np.asarray(b, dtype=np.float64)


def fold_conv(w: NDArray[np.floating], b: NDArray[np.floating] | None, s: F64, t: F64) -> tuple[F64, F64]:
    """Conv (any rank, any groups): scale W along axis 0, ``b' = s·b + t``."""
    w64 = np.asarray(w, dtype=np.float64)
    _check_channels(w64.shape[0], s, "Conv weight axis 0")
    return w64 * _per_axis(s, w64.ndim, 0), s * _bias(b, s.size) + t


def fold_conv_transpose(
    w: NDArray[np.floating], b: NDArray[np.floating] | None, s: F64, t: F64, group: int
) -> tuple[F64, F64]:
    """ConvTranspose: W is ``(C_in, C_out/group, k...)``; scale axis 1 within each group."""
    w64 = np.asarray(w, dtype=np.float64)
    c_in, c_out_g = w64.shape[0], w64.shape[1]
    if group < 1 or c_in % group:
        raise ConversionError(f"ConvTranspose weight has {c_in} input channels, not divisible by group={group}")
    _check_channels(c_out_g * group, s, "ConvTranspose output channels")
    kernel = w64.shape[2:]
    grouped = w64.reshape(group, c_in // group, c_out_g, *kernel)
    scale = s.reshape(group, 1, c_out_g, *([1] * len(kernel)))
    return (grouped * scale).reshape(w64.shape), s * _bias(b, s.size) + t


def fold_gemm(
    b_mat: NDArray[np.floating],
    c: NDArray[np.floating] | None,
    s: F64,
    t: F64,
    alpha: float,
    beta: float,
    trans_b: bool,
) -> tuple[F64, F64]:
    """Gemm: returns ``(B', C')`` for ``Y = A'·B' + C'`` (alpha = beta = 1 afterwards).

    ``B'`` keeps B's layout (transB unchanged); ``C'`` is ``s·(beta·C) + t``, broadcast with the channel axis,
    so a ``(M, 1)`` or ``(M, N)`` C stays valid.
    """
    b64 = np.asarray(b_mat, dtype=np.float64)
    axis = 0 if trans_b else 1
    _check_channels(b64.shape[axis], s, f"Gemm B axis {axis}")
    new_b = alpha * b64 * _per_axis(s, 2, axis)
    c64 = np.zeros(1) if c is None else np.asarray(c, dtype=np.float64)
    return new_b, s * (beta * c64) + t


def fold_matmul(w: NDArray[np.floating], bias: NDArray[np.floating] | None, s: F64, t: F64) -> tuple[F64, F64]:
    """MatMul ``X·W`` (+ bias): scale W along its last axis, ``bias' = s·bias + t``."""
    w64 = np.asarray(w, dtype=np.float64)
    _check_channels(w64.shape[-1], s, "MatMul weight last axis")
    b64 = np.zeros(1) if bias is None else np.asarray(bias, dtype=np.float64)
    return w64 * _per_axis(s, w64.ndim, -1), s * b64 + t


def forward_conv(
    w: NDArray[np.floating], b: NDArray[np.floating] | None, s: F64, t: F64, group: int
) -> tuple[F64, F64]:
    """Conv (any rank, groups) reading ``s·x + t``: scale input channels, push the shift into the bias."""
    w64 = np.asarray(w, dtype=np.float64)
    c_out, c_in_g = w64.shape[0], w64.shape[1]
    _check_channels(c_in_g * group, s, "Conv input channels")
    per_out = np.arange(c_out) // (c_out // group)  # the group of each output channel
    inputs = per_out[:, None] * c_in_g + np.arange(c_in_g)[None, :]  # (C_out, C_in/groups): input channel index
    s_full, t_full = np.broadcast_to(s, (c_in_g * group,)), np.broadcast_to(t, (c_in_g * group,))
    extra = (1,) * (w64.ndim - 2)
    new_w = w64 * s_full[inputs].reshape(c_out, c_in_g, *extra)
    pushed = np.einsum("ojk,oj->o", w64.reshape(c_out, c_in_g, -1), t_full[inputs])
    return new_w, _bias(b, c_out) + pushed


def forward_conv_transpose_1x1(
    w: NDArray[np.floating], b: NDArray[np.floating] | None, s: F64, t: F64, group: int
) -> tuple[F64, F64]:
    """ConvTranspose with a 1×1 kernel and stride 1 reading ``s·x + t`` (W is ``(C_in, C_out/groups, 1...)``)."""
    w64 = np.asarray(w, dtype=np.float64)
    c_in, c_out_g = w64.shape[0], w64.shape[1]
    _check_channels(c_in, s, "ConvTranspose input channels")
    s_full, t_full = np.broadcast_to(s, (c_in,)), np.broadcast_to(t, (c_in,))
    new_w = w64 * _per_axis(np.ascontiguousarray(s_full), w64.ndim, 0)
    flat = w64.reshape(c_in, c_out_g)
    grouped = (flat * t_full[:, None]).reshape(group, c_in // group, c_out_g).sum(axis=1)  # (group, C_out/groups)
    return new_w, _bias(b, group * c_out_g) + grouped.reshape(-1)


def forward_gemm(
    b_mat: NDArray[np.floating],
    c: NDArray[np.floating] | None,
    s: F64,
    t: F64,
    alpha: float,
    beta: float,
    trans_b: bool,
) -> tuple[F64, F64]:
    """Gemm (transA=0) reading ``s·A + t`` per column of A: returns ``(B', C')`` for alpha = beta = 1."""
    b64 = np.asarray(b_mat, dtype=np.float64)
    k_axis = 1 if trans_b else 0
    _check_channels(b64.shape[k_axis], s, f"Gemm B axis {k_axis}")
    effective = b64.T if trans_b else b64  # (K, N)
    t_full = np.broadcast_to(t, (effective.shape[0],))
    new_b = alpha * b64 * _per_axis(np.ascontiguousarray(np.broadcast_to(s, (b64.shape[k_axis],))), 2, k_axis)
    c64 = np.zeros(1) if c is None else np.asarray(c, dtype=np.float64)
    return new_b, beta * c64 + alpha * (t_full @ effective)


def forward_matmul(w: NDArray[np.floating], bias: NDArray[np.floating] | None, s: F64, t: F64) -> tuple[F64, F64]:
    """MatMul ``(s·X + t)·W`` with a 2-D W (+ an optional bias added after): ``W' = s[:, None]·W``, ``t·W (+ bias)``."""
    w64 = np.asarray(w, dtype=np.float64)
    _check_channels(w64.shape[0], s, "MatMul weight axis 0")
    k = w64.shape[0]
    s_full, t_full = np.broadcast_to(s, (k,)), np.broadcast_to(t, (k,))
    pushed = t_full @ w64
    b64 = np.zeros(1) if bias is None else np.asarray(bias, dtype=np.float64)
    return w64 * s_full[:, None], b64 + pushed


def _check_channels(n: int, s: F64, where: str) -> None:
    if s.size not in (1, n):
        raise ConversionError(f"{where} has {n} channels but the BatchNorm has {s.size}")


def cast_exact(value: F64, dtype: np.dtype[np.floating] | type[np.floating], what: str) -> NDArray[np.floating]:
    """Cast a float64 result once to ``dtype``; a value beyond the dtype's range is an error naming ``what``."""
    target = np.dtype(dtype)
    finfo = np.finfo(target)
    too_big = np.abs(value) > float(finfo.max)
    if np.any(too_big):
        worst = float(np.max(np.abs(value[too_big])))
        raise ConversionError(f"{what}: folded value {worst:.6g} overflows {target.name} (max {float(finfo.max):.6g})")
    return value.astype(target)
