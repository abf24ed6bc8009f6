"""Networks with BatchNorm built in code (no downloads): for tests, benchmarks and demos.

Weights are He-initialised and every BatchNorm carries trained-looking statistics (γ around 1, small β,
non-trivial running mean and variance), so a model's outputs stay in a sensible range at any depth and a
wrong fold shows up as a large error rather than hiding in a degenerate network.

A public module of bnfold (``from converter import zoo``), kept stable: the tests, the benchmarks and the
examples build their networks here, and users can do the same to try a fold or a server without a download.
It is not re-exported from ``converter`` itself, whose surface is the conversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, TensorProto, helper, numpy_helper


class Builder:
    """A tiny graph builder: each method adds a node and returns the name of its output."""

    def __init__(self, opset: int = 17, seed: int = 0, dtype: type[np.floating] = np.float32) -> None:
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.nodes: list[object] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[object] = []
        self.outputs: list[object] = []
        self._count: dict[str, int] = {}

    def name(self, kind: str) -> str:
        k = self._count.get(kind, 0)
        self._count[kind] = k + 1
        return f"{kind}{k}"

    def const(self, value: np.ndarray, kind: str = "w") -> str:
        name = self.name(kind)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: Sequence[str], kind: str | None = None, **attrs: Any) -> str:
        name = self.name(kind or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name

    def input(self, name: str, shape: Sequence[int | str], elem: int = TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, value: str, name: str | None = None, elem: int = TensorProto.FLOAT) -> str:
        if name and name != value:
            value = self.node("Identity", [value], kind=name)
            self.nodes[-1].output[0] = name  # type: ignore[attr-defined]
            self.nodes[-1].name = name  # type: ignore[attr-defined]
            value = name
        self.outputs.append(helper.make_tensor_value_info(value, elem, None))
        return value

    # layers ----------------------------------------------------------------------------------------
    def weight(self, shape: Sequence[int], fan_in: int) -> str:
        return self.const(self.rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1)), "w")

    def astype(self, value: np.ndarray) -> np.ndarray:
        return np.asarray(value, dtype=self.dtype)

    def const_f(self, value: np.ndarray, kind: str) -> str:
        return self.const(self.astype(value), kind)

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        bias: bool = False,
        dilation: int = 1,
        dims: int = 2,
    ) -> str:
        shape = (cout, cin // group, *([k] * dims))
        fan_in = (cin // group) * k**dims
        w = self.const_f(self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in), "w")
        inputs = [x, w]
        if bias:
            inputs.append(self.const_f(self.rng.standard_normal(cout) * 0.1, "b"))
        pad = dilation * (k - 1) // 2
        return self.node(
            "Conv",
            inputs,
            strides=[stride] * dims,
            pads=[pad] * (2 * dims),
            group=group,
            dilations=[dilation] * dims,
            kernel_shape=[k] * dims,
        )

    def conv_transpose(self, x: str, cin: int, cout: int, k: int = 2, stride: int = 2, group: int = 1) -> str:
        shape = (cin, cout // group, k, k)
        w = self.const_f(self.rng.standard_normal(shape) * np.sqrt(2.0 / (cin // group * k * k)), "w")
        return self.node("ConvTranspose", [x, w], strides=[stride, stride], group=group, kernel_shape=[k, k])

    def bn_params(self, channels: int) -> list[str]:
        r = self.rng
        return [
            self.const_f(r.uniform(0.5, 1.5, channels), "gamma"),
            self.const_f(r.normal(0.0, 0.1, channels), "beta"),
            self.const_f(r.normal(0.0, 0.2, channels), "mean"),
            self.const_f(r.uniform(0.5, 2.0, channels), "var"),
        ]

    def bn(self, x: str, channels: int, eps: float = 1e-5) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(channels)], kind="bn", epsilon=eps)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def clip6(self, x: str) -> str:
        lo = self.const_f(np.array(0.0), "lo")
        hi = self.const_f(np.array(6.0), "hi")
        return self.node("Clip", [x, lo, hi], kind="relu6")

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b])

    def gemm(self, x: str, fin: int, fout: int, bias: bool = True, trans_b: bool = True) -> str:
        shape = (fout, fin) if trans_b else (fin, fout)
        inputs = [x, self.const_f(self.rng.standard_normal(shape) * np.sqrt(2.0 / fin), "w")]
        if bias:
            inputs.append(self.const_f(self.rng.standard_normal(fout) * 0.1, "b"))
        return self.node("Gemm", inputs, transB=int(trans_b))

    def global_pool(self, x: str) -> str:
        return self.node("Flatten", [self.node("GlobalAveragePool", [x], kind="gap")])

    def build(self, name: str = "bnfold_zoo") -> ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.initializers)  # type: ignore[arg-type]
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="bnfold")
        model.ir_version = min(model.ir_version, 10)  # readable by older ONNX Runtime releases too
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:
            if out.name in inferred and not out.type.tensor_type.HasField("shape"):
                out.CopyFrom(inferred[out.name])
        return model


def conv_bn(b: Builder, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1) -> str:
    return b.bn(b.conv(x, cin, cout, k, stride, group), cout)


def resnet(
    blocks: Sequence[int] = (2, 2, 2, 2),
    bottleneck: bool = False,
    classes: int = 1000,
    image: int = 224,
    batch: int | str = 1,
    seed: int = 0,
) -> ModelProto:
    """ResNet v1: ``resnet()`` is ResNet-18 (11.7 M parameters); ``resnet((3, 4, 6, 3), True)`` is ResNet-50."""
    b = Builder(seed=seed)
    x = b.input("input", [batch, 3, image, image])
    x = b.relu(conv_bn(b, x, 3, 64, 7, 2))
    x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, count in enumerate(blocks):
        width = 64 * 2**stage
        cout = width * 4 if bottleneck else width
        for i in range(count):
            stride = 2 if i == 0 and stage > 0 else 1
            if bottleneck:
                y = b.relu(conv_bn(b, x, cin, width, 1))
                y = b.relu(conv_bn(b, y, width, width, 3, stride))
                y = conv_bn(b, y, width, cout, 1)
            else:
                y = b.relu(conv_bn(b, x, cin, width, 3, stride))
                y = conv_bn(b, y, width, cout, 3)
            shortcut = x if (stride == 1 and cin == cout) else conv_bn(b, x, cin, cout, 1, stride)
            x = b.relu(b.add(y, shortcut))
            cin = cout
    b.output(b.gemm(b.global_pool(x), cin, classes), "logits")
    return b.build("resnet")


def mobilenet_v2(classes: int = 1000, image: int = 224, batch: int | str = 1, seed: int = 0) -> ModelProto:
    """MobileNetV2 (3.5 M parameters): inverted residuals with depthwise 3×3 convolutions, each with BN."""
    # (expansion, output channels, blocks, first stride) per stage, as in the paper
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
    settings.append((6, 320, 1, 1))
    b = Builder(seed=seed)
    x = b.input("input", [batch, 3, image, image])
    x = b.clip6(conv_bn(b, x, 3, 32, 3, 2))
    cin = 32
    for expand, cout, count, first_stride in settings:
        for i in range(count):
            stride = first_stride if i == 0 else 1
            hidden = cin * expand
            y = x if expand == 1 else b.clip6(conv_bn(b, x, cin, hidden, 1))
            y = b.clip6(conv_bn(b, y, hidden, hidden, 3, stride, group=hidden))
            y = conv_bn(b, y, hidden, cout, 1)
            x = b.add(x, y) if stride == 1 and cin == cout else y
            cin = cout
    x = b.clip6(conv_bn(b, x, cin, 1280, 1))
    b.output(b.gemm(b.global_pool(x), 1280, classes), "logits")
    return b.build("mobilenet_v2")
