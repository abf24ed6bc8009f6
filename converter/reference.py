"""BatchNorm from its definition, in numpy: the oracle for every test. A public module of bnfold.

Train mode, per channel c (axis 1 of an ``(N, C, ...)`` tensor), over the batch and spatial axes::

    μ_B = mean(x),  σ²_B = mean((x − μ_B)²)
    x̂ = (x − μ_B) / sqrt(σ²_B + ε),   y = γ·x̂ + β
    running ← m·running + (1 − m)·batch_stat            (m is the momentum, e.g. 0.9)

Test mode uses the running statistics instead of the batch ones. As one affine map per channel
(the ``tf.nn.batch_normalization`` form)::

    s = γ / sqrt(var + ε),   y = s·x + (β − μ·s)

Nothing here is used by the conversion itself: it is the independent statement of what a conversion must
preserve, and the layer the bundled digits model was trained with (``examples/digits``). Public and kept
stable (``from converter import reference``) so that users can check a fold, or train a small network, against
the same definition; it is not re-exported from ``converter`` itself, whose surface is the conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


@dataclass(frozen=True)
class BatchNormParams:
    """Learned and running parameters of one BatchNorm layer over ``channels`` channels."""

    gamma: Array
    beta: Array
    running_mean: Array
    running_var: Array
    eps: float = 1e-5
    momentum: float = 0.9

    @classmethod
    def initial(cls, channels: int, eps: float = 1e-5, momentum: float = 0.9) -> BatchNormParams:
        """γ = 1, β = 0, running mean 0 and running variance 1: a freshly built layer."""
        return cls(
            gamma=np.ones(channels),
            beta=np.zeros(channels),
            running_mean=np.zeros(channels),
            running_var=np.ones(channels),
            eps=eps,
            momentum=momentum,
        )


@dataclass(frozen=True)
class TrainCache:
    """What the backward pass of a train step needs."""

    x_hat: Array
    inv_std: Array
    gamma: Array
    reduce_axes: tuple[int, ...] = field(default=())


def _channel_shape(x: NDArray[np.floating], axis: int) -> tuple[int, ...]:
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return tuple(shape)


def _reduce_axes(x: NDArray[np.floating], axis: int) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(f"BatchNorm needs an (N, C, ...) input, got shape {x.shape}")
    return tuple(a for a in range(x.ndim) if a != axis % x.ndim)


def train_step(x: NDArray[np.floating], p: BatchNormParams, axis: int = 1) -> tuple[Array, BatchNormParams, TrainCache]:
    """Normalise with the batch statistics; return y, the parameters with updated running stats, a cache."""
    x64 = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x64, axis)
    cshape = _channel_shape(x64, axis)
    mu = x64.mean(axis=axes)
    var = ((x64 - mu.reshape(cshape)) ** 2).mean(axis=axes)
    inv_std = 1.0 / np.sqrt(var + p.eps)
    x_hat = (x64 - mu.reshape(cshape)) * inv_std.reshape(cshape)
    y = p.gamma.reshape(cshape) * x_hat + p.beta.reshape(cshape)
    m = p.momentum
    updated = replace(
        p,
        running_mean=m * p.running_mean + (1 - m) * mu,
        running_var=m * p.running_var + (1 - m) * var,
    )
    return y, updated, TrainCache(x_hat=x_hat, inv_std=inv_std, gamma=p.gamma, reduce_axes=axes)


def train_backward(dy: NDArray[np.floating], cache: TrainCache, axis: int = 1) -> tuple[Array, Array, Array]:
    """Gradients (dx, dγ, dβ) of a train step, the batch statistics differentiated through."""
    dy64 = np.asarray(dy, dtype=np.float64)
    axes = cache.reduce_axes
    cshape = _channel_shape(dy64, axis)
    count = dy64.size // dy64.shape[axis]
    dbeta = dy64.sum(axis=axes)
    dgamma = (dy64 * cache.x_hat).sum(axis=axes)
    dx_hat = dy64 * cache.gamma.reshape(cshape)
    dx = (
        cache.inv_std.reshape(cshape)
        / count
        * (
            count * dx_hat
            - dx_hat.sum(axis=axes).reshape(cshape)
            - cache.x_hat * (dx_hat * cache.x_hat).sum(axis=axes).reshape(cshape)
        )
    )
    return dx, dgamma, dbeta


def test_step(x: NDArray[np.floating], p: BatchNormParams, axis: int = 1) -> Array:
    """Normalise with the running statistics (inference)."""
    x64 = np.asarray(x, dtype=np.float64)
    _reduce_axes(x64, axis)  # validates the rank
    cshape = _channel_shape(x64, axis)
    x_hat = (x64 - p.running_mean.reshape(cshape)) / np.sqrt(p.running_var.reshape(cshape) + p.eps)
    return p.gamma.reshape(cshape) * x_hat + p.beta.reshape(cshape)


def affine(p: BatchNormParams) -> tuple[Array, Array]:
    """The test step as one per-channel map y = s·x + t: returns (s, t)."""
    s = np.asarray(p.gamma, np.float64) / np.sqrt(np.asarray(p.running_var, np.float64) + p.eps)
    t = np.asarray(p.beta, np.float64) - np.asarray(p.running_mean, np.float64) * s
    return s, t
