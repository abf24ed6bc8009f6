"""Small PyTorch architectures with BatchNorm, built in code (torchvision does not import here), and helpers.

Each builder returns ``(module, input_shape, kept)``: ``kept`` is how many BatchNorms cannot be folded (the
pre-activation ones). :func:`trained` gives every BatchNorm trained-looking statistics and affine parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3×3 conv+BN, identity or 1×1 conv+BN shortcut, add, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.downsample(x))


def resnet() -> tuple[nn.Module, tuple[int, ...], int]:
    net = nn.Sequential(
        conv_bn(3, 16),
        BasicBlock(16, 16),
        BasicBlock(16, 32, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return net, (2, 3, 32, 32), 0


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 project (linear bottleneck), residual when it fits."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def mobilenet() -> tuple[nn.Module, tuple[int, ...], int]:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, 2, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, 1, 1, groups=16),  # depthwise with a bias
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        InvertedResidual(16, 24, stride=2),
        InvertedResidual(24, 24, stride=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 32),  # Linear + BatchNorm1d head -> Gemm
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return net, (2, 3, 32, 32), 0


def decoder() -> tuple[nn.Module, tuple[int, ...], int]:
    """ConvTranspose upsampling, with and without bias, and grouped (the weight's axis 1 per group)."""
    net = nn.Sequential(
        conv_bn(3, 16, stride=2),
        nn.ConvTranspose2d(16, 12, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.ConvTranspose2d(12, 8, 3, stride=2, padding=1, output_padding=1, groups=2),
        nn.BatchNorm2d(8),
    )
    return net, (2, 3, 32, 32), 0


def conv1d() -> tuple[nn.Module, tuple[int, ...], int]:
    net = nn.Sequential(
        nn.Conv1d(4, 16, 5, padding=2),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Conv1d(16, 24, 3, stride=2, dilation=2, bias=False),
        nn.BatchNorm1d(24),
        nn.ReLU(),
        nn.Conv1d(24, 24, 3, padding=1, groups=24),
        nn.BatchNorm1d(24),
    )
    return net, (2, 4, 64), 0


def conv3d() -> tuple[nn.Module, tuple[int, ...], int]:
    net = nn.Sequential(
        nn.Conv3d(2, 8, 3, padding=1, bias=False),
        nn.BatchNorm3d(8),
        nn.ReLU(),
        nn.Conv3d(8, 12, 3, stride=2, padding=1),
        nn.BatchNorm3d(12),
    )
    return net, (2, 2, 8, 16, 16), 0


class PreActBlock(nn.Module):
    """Pre-activation ResNet block (BN → ReLU → conv): the first BN reads the block input, which the shortcut
    also reads, so it has no foldable producer; the BN after the residual Add has none either."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)  # after conv1: folds
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(torch.relu(self.bn1(x)))
        y = self.conv2(torch.relu(self.bn2(y)))
        return x + y


def preact() -> tuple[nn.Module, tuple[int, ...], int]:
    net = nn.Sequential(
        nn.BatchNorm2d(3),  # on the graph input: nothing to fold into
        nn.Conv2d(3, 16, 3, 1, 1),
        PreActBlock(16),
        nn.BatchNorm2d(16),  # after the Add
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    return net, (2, 3, 32, 32), 3


ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...], int]]] = {
    "resnet": resnet,
    "mobilenet": mobilenet,
    "decoder": decoder,
    "conv1d": conv1d,
    "conv3d": conv3d,
    "preact": preact,
}


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, _BN)]


def trained(module: nn.Module, shape: tuple[int, ...], seed: int = 0, steps: int = 4) -> nn.Module:
    """Trained-looking BatchNorms, then eval mode: random γ/β, and running statistics from a few train-mode
    forward passes on shifted, scaled random data (cumulative average, so they are the data's statistics)."""
    torch.manual_seed(seed)
    bns = batchnorms(module)
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)  # type: ignore[operator]
            bn.bias.normal_(0.0, 0.3)  # type: ignore[operator]
            bn.momentum = None  # cumulative moving average
        module.train()
        batch = (8, *shape[1:])
        for _ in range(steps):
            module(torch.randn(batch) * 1.5 + 0.3)
    for bn in bns:
        bn.momentum = 0.1
    return module.eval()


def inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def run_onnx(model: onnx.ModelProto | str, feeds: dict[str, NDArray[np.float32]]) -> list[NDArray[np.float32]]:
    """Run in ONNX Runtime with every graph optimisation off (ORT would fuse Conv+BN itself otherwise)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return list(ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds))


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


#: What the tests demand of ONNX Runtime vs PyTorch: max|Δ| ≤ RTOL·max|torch| (float32; measured ≤ 6.4e-7).
RTOL = 1e-5


def assert_close(got: NDArray[np.float32], want: NDArray[np.float32]) -> None:
    assert got.shape == want.shape
    err = float(np.abs(got.astype(np.float64) - want).max())
    scale = float(np.abs(want).max())
    assert err <= RTOL * scale, f"max|Δ| {err:.3g} > {RTOL:g}·{scale:.3g}"
