"""The digits classifier in numpy: im2col convolutions, ``converter.reference``'s BatchNorm, ReLU and linear layers.

Architecture (input ``(N, 1, 8, 8)``, raw pixel values 0..16 as ``sklearn.datasets.load_digits`` gives them)::

    x/16 → Conv3×3(1→16, pad 1) → BN → ReLU → Conv3×3(16→32, stride 2, pad 1) → BN → ReLU
         → Flatten (512) → Linear(512→32, no bias) → BN → ReLU → Linear(32→10) → logits

The convolutions and the first linear layer have no bias: the BatchNorm after each makes one redundant.
Every BatchNorm is :mod:`converter.reference` (``train_step``/``train_backward`` in training, ``test_step`` at
inference), never a second implementation. Everything is float64.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from converter.reference import BatchNormParams, TrainCache, test_step, train_backward, train_step

Array = NDArray[np.float64]

PIXEL_SCALE = 1.0 / 16.0  # exact in binary: x·(1/16) == x/16
CONV1, CONV2, HIDDEN, CLASSES = 16, 32, 32, 10
KERNEL = 3
CONV1_STRIDE, CONV2_STRIDE, PAD = 1, 2, 1
EPS, MOMENTUM = 1e-5, 0.9
BATCHNORMS = ("bn1", "bn2", "bn3")


@dataclass(frozen=True)
class Params:
    """All parameters. Linear weights are stored ``(out, in)``: ONNX Gemm's B with ``transB=1``."""

    conv1: Array  # (16, 1, 3, 3)
    bn1: BatchNormParams
    conv2: Array  # (32, 16, 3, 3)
    bn2: BatchNormParams
    fc1: Array  # (32, 512)
    bn3: BatchNormParams
    fc2: Array  # (10, 32)
    fc2_bias: Array  # (10,)

    def trainable(self) -> dict[str, Array]:
        """The learned arrays by name (running statistics are not learned by gradient)."""
        out = {"conv1": self.conv1, "conv2": self.conv2, "fc1": self.fc1, "fc2": self.fc2, "fc2_bias": self.fc2_bias}
        for name in BATCHNORMS:
            bn: BatchNormParams = getattr(self, name)
            out[f"{name}.gamma"], out[f"{name}.beta"] = bn.gamma, bn.beta
        return out

    def with_trainable(self, values: dict[str, Array]) -> Params:
        """A copy with the learned arrays replaced (running statistics kept)."""
        bns = {
            name: replace(getattr(self, name), gamma=values[f"{name}.gamma"], beta=values[f"{name}.beta"])
            for name in BATCHNORMS
        }
        return replace(
            self,
            conv1=values["conv1"],
            conv2=values["conv2"],
            fc1=values["fc1"],
            fc2=values["fc2"],
            fc2_bias=values["fc2_bias"],
            **bns,
        )


def _conv_out(size: int, stride: int) -> int:
    return (size + 2 * PAD - KERNEL) // stride + 1


def init_params(rng: np.random.Generator) -> Params:
    """He-normal weights, zero output bias, fresh BatchNorms (γ = 1, β = 0, running 0 / 1)."""

    def he(shape: tuple[int, ...], fan_in: int) -> Array:
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)

    side = _conv_out(_conv_out(8, CONV1_STRIDE), CONV2_STRIDE)
    flat = CONV2 * side * side
    return Params(
        conv1=he((CONV1, 1, KERNEL, KERNEL), KERNEL * KERNEL),
        bn1=BatchNormParams.initial(CONV1, EPS, MOMENTUM),
        conv2=he((CONV2, CONV1, KERNEL, KERNEL), CONV1 * KERNEL * KERNEL),
        bn2=BatchNormParams.initial(CONV2, EPS, MOMENTUM),
        fc1=he((HIDDEN, flat), flat),
        bn3=BatchNormParams.initial(HIDDEN, EPS, MOMENTUM),
        fc2=rng.normal(0.0, np.sqrt(1.0 / HIDDEN), size=(CLASSES, HIDDEN)),
        fc2_bias=np.zeros(CLASSES),
    )


# --- convolution by im2col -------------------------------------------------------------------------------


def im2col(x: Array, stride: int) -> Array:
    """``(N, C, H, W)`` → ``(N·Ho·Wo, C·k·k)`` patches of the zero-padded input, rows in (n, ho, wo) order."""
    n, c = x.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (KERNEL, KERNEL), axis=(2, 3))[:, :, ::stride, ::stride]
    ho, wo = windows.shape[2:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * KERNEL * KERNEL)


def col2im(dcols: Array, x_shape: tuple[int, ...], stride: int) -> Array:
    """Adjoint of :func:`im2col`: scatter-add patch gradients back onto the (unpadded) input."""
    n, c, h, w = x_shape
    ho, wo = _conv_out(h, stride), _conv_out(w, stride)
    patches = dcols.reshape(n, ho, wo, c, KERNEL, KERNEL).transpose(0, 3, 4, 5, 1, 2)  # (n, c, k, k, ho, wo)
    dxp = np.zeros((n, c, h + 2 * PAD, w + 2 * PAD))
    for i in range(KERNEL):
        for j in range(KERNEL):
            dxp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride] += patches[:, :, i, j]
    return dxp[:, :, PAD : PAD + h, PAD : PAD + w]


def conv_forward(x: Array, w: Array, stride: int) -> tuple[Array, Array]:
    """3×3 convolution with padding 1 (no bias); returns the output and the patches for the backward pass."""
    n, _, h, wd = x.shape
    cols = im2col(x, stride)
    out = cols @ w.reshape(w.shape[0], -1).T
    return out.reshape(n, _conv_out(h, stride), _conv_out(wd, stride), w.shape[0]).transpose(0, 3, 1, 2), cols


def conv_backward(dout: Array, cols: Array, x_shape: tuple[int, ...], w: Array, stride: int) -> tuple[Array, Array]:
    """Gradients ``(dx, dw)`` of :func:`conv_forward`."""
    dflat = dout.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
    dw = (dflat.T @ cols).reshape(w.shape)
    dx = col2im(dflat @ w.reshape(w.shape[0], -1), x_shape, stride)
    return dx, dw


# --- the network ---------------------------------------------------------------------------------------------


def forward(p: Params, pixels: NDArray[np.floating]) -> Array:
    """Inference (test mode: BatchNorm uses the running statistics). ``pixels`` is ``(N, 1, 8, 8)``, 0..16."""
    x = np.asarray(pixels, dtype=np.float64) * PIXEL_SCALE
    h = np.maximum(test_step(conv_forward(x, p.conv1, CONV1_STRIDE)[0], p.bn1), 0.0)
    h = np.maximum(test_step(conv_forward(h, p.conv2, CONV2_STRIDE)[0], p.bn2), 0.0)
    h = h.reshape(h.shape[0], -1)
    h = np.maximum(test_step(h @ p.fc1.T, p.bn3), 0.0)
    return h @ p.fc2.T + p.fc2_bias


@dataclass(frozen=True)
class ForwardCache:
    x0: Array
    cols1: Array
    bn1: TrainCache
    a1: Array  # BN1 output (pre-ReLU)
    h1: Array
    cols2: Array
    bn2: TrainCache
    a2: Array
    flat: Array
    bn3: TrainCache
    a3: Array
    h3: Array


def forward_train(p: Params, pixels: NDArray[np.floating]) -> tuple[Array, Params, ForwardCache]:
    """Training forward pass: BatchNorm on batch statistics; returns logits, updated running stats, a cache."""
    x0 = np.asarray(pixels, dtype=np.float64) * PIXEL_SCALE
    z1, cols1 = conv_forward(x0, p.conv1, CONV1_STRIDE)
    a1, bn1, c1 = train_step(z1, p.bn1)
    h1 = np.maximum(a1, 0.0)
    z2, cols2 = conv_forward(h1, p.conv2, CONV2_STRIDE)
    a2, bn2, c2 = train_step(z2, p.bn2)
    flat = np.maximum(a2, 0.0).reshape(a2.shape[0], -1)
    a3, bn3, c3 = train_step(flat @ p.fc1.T, p.bn3)
    h3 = np.maximum(a3, 0.0)
    logits = h3 @ p.fc2.T + p.fc2_bias
    cache = ForwardCache(x0, cols1, c1, a1, h1, cols2, c2, a2, flat, c3, a3, h3)
    return logits, replace(p, bn1=bn1, bn2=bn2, bn3=bn3), cache


def backward(p: Params, cache: ForwardCache, dlogits: Array) -> dict[str, Array]:
    """Gradients of the loss w.r.t. :meth:`Params.trainable`, given ``dloss/dlogits``."""
    g: dict[str, Array] = {"fc2": dlogits.T @ cache.h3, "fc2_bias": dlogits.sum(axis=0)}
    da3 = (dlogits @ p.fc2) * (cache.a3 > 0)
    dz3, g["bn3.gamma"], g["bn3.beta"] = train_backward(da3, cache.bn3)
    g["fc1"] = dz3.T @ cache.flat
    da2 = (dz3 @ p.fc1).reshape(cache.a2.shape) * (cache.a2 > 0)
    dz2, g["bn2.gamma"], g["bn2.beta"] = train_backward(da2, cache.bn2)
    dh1, g["conv2"] = conv_backward(dz2, cache.cols2, cache.h1.shape, p.conv2, CONV2_STRIDE)
    da1 = dh1 * (cache.a1 > 0)
    dz1, g["bn1.gamma"], g["bn1.beta"] = train_backward(da1, cache.bn1)
    _, g["conv1"] = conv_backward(dz1, cache.cols1, cache.x0.shape, p.conv1, CONV1_STRIDE)
    return g


def softmax_cross_entropy(logits: Array, labels: NDArray[np.integer]) -> tuple[float, Array]:
    """Mean cross-entropy and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = float(-log_probs[np.arange(n), labels].mean())
    grad = np.exp(log_probs)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n
