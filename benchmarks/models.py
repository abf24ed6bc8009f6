"""The benchmark models built in code (seeded, so every benchmark and run builds the same weights)."""

from __future__ import annotations

from typing import Any


def build_tiny(batch: int | str = 1) -> Any:
    """input [batch, 20] → Gemm 20→64 → BatchNormalization → Relu → Gemm 64→10 → logits."""
    from converter.zoo import Builder

    b = Builder(seed=0)
    x = b.input("input", [batch, 20])
    b.output(b.gemm(b.relu(b.bn(b.gemm(x, 20, 64), 64)), 64, 10), "logits")
    return b.build("tiny")


def build_conv224(batch: int | str = 1) -> Any:
    """input [batch, 3, 224, 224] → 4× [Conv 3×3 s2 + BN + Relu] (3→16→32→64→128) → GlobalAveragePool → Gemm."""
    from converter.zoo import Builder, conv_bn

    b = Builder(seed=0)
    x = b.input("input", [batch, 3, 224, 224])
    cin = 3
    for cout in (16, 32, 64, 128):
        x = b.relu(conv_bn(b, x, cin, cout, 3, 2))
        cin = cout
    b.output(b.gemm(b.global_pool(x), cin, 10), "logits")
    return b.build("conv224")
