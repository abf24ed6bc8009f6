"""Networks with BatchNorm built in code (no downloads): for tests, benchmarks and demos.

Weights are He-initialised and every BatchNorm carries trained-looking statistics (γ around 1, small β,
non-trivial running mean and variance), so a model's outputs stay in a sensible range at any depth and a
wrong fold shows up as a large error rather than hiding in a degenerate network.

A public module of bnfold (``from converter import zoo``), kept stable: the tests, the benchmarks and the
examples build their networks here, and users can do the same to try a fold or a server without a download.
It is not re-exported from ``converter`` itself, whose surface is the conversion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# ------------------------------------------------------------------------------------------------------------
# Patterns that only bnfold folds: each case is a small network with one rule to exercise, or the twin that must
# keep its BatchNorm. ``kinds`` lists the FoldKind values expected for the folded BatchNorms, in graph order.


@dataclass(frozen=True)
class FoldCase:
    name: str
    build: Callable[[], ModelProto]
    kinds: tuple[str, ...]  # FoldKind values of the folded BatchNorms, in graph order
    kept: int  # BatchNorms that must stay
    why: str  # what the case shows (for the benchmark table and test ids)


def _linear(b: Builder, x: str, fin: int, fout: int) -> str:
    """``nn.Linear`` as exporters write it without constant folding: ``MatMul(x, Transpose(W)) + bias``."""
    w = b.const_f(b.rng.standard_normal((fout, fin)) * np.sqrt(2.0 / fin), "w")
    return b.add(
        b.node("MatMul", [x, b.node("Transpose", [w], perm=[1, 0])]), b.const_f(b.rng.normal(0, 0.1, fout), "b")
    )


def _conv(b: Builder, x: str, cin: int, cout: int, k: int, pad: int, bias: bool = True) -> str:
    shape = (cout, cin, k, k)
    inputs = [x, b.const_f(b.rng.standard_normal(shape) * np.sqrt(2.0 / (cin * k * k)), "w")]
    if bias:
        inputs.append(b.const_f(b.rng.normal(0, 0.1, cout), "b"))
    return b.node("Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4)


def linear_bn() -> ModelProto:
    """MLP block: nn.Linear (MatMul of a transposed weight, + bias) → BatchNorm1d → ReLU."""
    b = Builder(seed=11)
    x = b.input("input", [4, 16])
    b.output(b.relu(b.bn(_linear(b, x, 16, 8), 8)), "out")
    return b.build("linear_bn")


def weight_expression() -> ModelProto:
    """Conv whose weight is ``Reshape(Cast(Constant float16))`` and a Gemm whose B is a Slice of a Concat."""
    b = Builder(seed=12)
    x = b.input("input", [2, 3, 8, 8])
    w16 = (b.rng.standard_normal((6, 27)) * 0.3).astype(np.float16)
    const = b.node("Constant", [], kind="const", value=numpy_helper.from_array(w16, "w16"))
    cast = b.node("Cast", [const], to=TensorProto.FLOAT)
    w = b.node("Reshape", [cast, b.const(np.array([6, 3, 3, 3], np.int64), "shape")])
    y = b.bn(b.node("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), 6)
    y = b.global_pool(b.relu(y))
    halves = [b.const_f(b.rng.standard_normal((6, 5)) * 0.5, "w") for _ in range(2)]
    both = b.node("Concat", halves, axis=1)
    starts, ends = b.const(np.array([2], np.int64), "start"), b.const(np.array([7], np.int64), "end")
    axes = b.const(np.array([1], np.int64), "axes")
    gemm_b = b.node("Slice", [both, starts, ends, axes])
    b.output(b.bn(b.node("Gemm", [y, gemm_b]), 5), "out")
    return b.build("weight_expression")


def bn_before_linear() -> ModelProto:
    """Tabular model: BatchNorm1d on the raw features, then nn.Linear (forward fold, MatMul + Add)."""
    b = Builder(seed=13)
    x = b.input("input", [4, 10])
    b.output(b.relu(_linear(b, b.bn(x, 10), 10, 6)), "out")
    return b.build("bn_before_linear")


def keras_conv_relu_bn() -> ModelProto:
    """Keras order Conv → ReLU → BN, then a 1×1 Conv (forward) and Conv → ReLU → BN → Flatten → Dense (forward)."""
    b = Builder(seed=14)
    x = b.input("input", [2, 3, 6, 6])
    y = b.bn(b.relu(_conv(b, x, 3, 8, 3, 1)), 8)
    y = b.bn(b.relu(_conv(b, y, 8, 4, 1, 0)), 4)
    y = b.node("Flatten", [y])
    b.output(b.gemm(y, 4 * 36, 5), "out")
    return b.build("keras_conv_relu_bn")


def inception_concat() -> ModelProto:
    """Inception-style block: 1×1, 3×3 and 5×5 branches concatenated on channels, one BN after the Concat."""
    b = Builder(seed=15)
    x = b.input("input", [2, 4, 8, 8])
    branches = [_conv(b, x, 4, 3, 1, 0), _conv(b, x, 4, 5, 3, 1, bias=False), _conv(b, x, 4, 2, 5, 2)]
    b.output(b.relu(b.bn(b.node("Concat", branches, axis=1), 10)), "out")
    return b.build("inception_concat")


def crnn_squeeze() -> ModelProto:
    """CRNN text-recogniser tail: a Conv2d whose output height is 1, squeezed to (N, C, W), then BatchNorm1d."""
    b = Builder(seed=16)
    x = b.input("input", [2, 3, 4, 16])
    w = b.const_f(b.rng.standard_normal((8, 3, 4, 3)) * 0.3, "w")
    y = b.node("Conv", [x, w], kernel_shape=[4, 3], pads=[0, 1, 0, 1])  # (2, 8, 1, 16)
    y = b.node("Squeeze", [y, b.const(np.array([2], np.int64), "axes")])
    b.output(b.relu(b.bn(y, 8)), "out")
    return b.build("crnn_squeeze")


def upsample_decoder() -> ModelProto:
    """ConvTranspose 2×2/2 → BN (backward), then ReLU → BN → 1×1 ConvTranspose (forward)."""
    b = Builder(seed=17)
    x = b.input("input", [2, 4, 5, 5])
    y = b.relu(b.bn(b.conv_transpose(x, 4, 6, group=2), 6))
    y = b.bn(y, 6)
    w = b.const_f(b.rng.standard_normal((6, 3, 1, 1)) * 0.5, "w")
    b.output(b.node("ConvTranspose", [y, w], group=1, kernel_shape=[1, 1]), "out")
    return b.build("upsample_decoder")


def padded_next_conv() -> ModelProto:
    """Twin of keras_conv_relu_bn: the next Conv pads with zeros, so the BN after ReLU stays."""
    b = Builder(seed=14)
    x = b.input("input", [2, 3, 6, 6])
    y = b.bn(b.relu(_conv(b, x, 3, 8, 3, 1)), 8)
    b.output(_conv(b, y, 8, 4, 3, 1), "out")
    return b.build("padded_next_conv")


def two_readers() -> ModelProto:
    """Twins: a BN whose output two Convs read, and a Conv whose output a BN and a ReLU read."""
    b = Builder(seed=18)
    x = b.input("input", [2, 3, 6, 6])
    y = b.bn(b.relu(_conv(b, x, 3, 4, 3, 1)), 4)
    left, right = _conv(b, y, 4, 4, 1, 0), _conv(b, y, 4, 4, 1, 0)
    shared = _conv(b, b.add(left, right), 4, 4, 1, 0)
    b.output(b.add(b.bn(shared, 4), b.relu(shared)), "out")
    return b.build("two_readers")


def relu_between() -> ModelProto:
    """Twin: Conv → ReLU → BN → ReLU → 1×1 Conv: neither the producer nor the reader is linear."""
    b = Builder(seed=19)
    x = b.input("input", [2, 3, 6, 6])
    y = b.relu(b.bn(b.relu(_conv(b, x, 3, 4, 3, 1)), 4))
    b.output(_conv(b, y, 4, 4, 1, 0), "out")
    return b.build("relu_between")


def concat_spatial_axis() -> ModelProto:
    """Twin of inception_concat: the Concat joins along height (axis 2), so BN channels span both inputs."""
    b = Builder(seed=20)
    x = b.input("input", [2, 4, 8, 8])
    joined = b.node("Concat", [_conv(b, x, 4, 6, 1, 0), _conv(b, x, 4, 6, 3, 1)], axis=2)
    b.output(b.relu(b.bn(joined, 6)), "out")
    return b.build("concat_spatial_axis")


def reshape_mixes_channels() -> ModelProto:
    """Twin of crnn_squeeze: a Reshape (1, 4, 6) → (2, 4, 3) keeps the channel count but not which element is where."""
    b = Builder(seed=21)
    x = b.input("input", [1, 3, 8])
    w = b.const_f(b.rng.standard_normal((4, 3, 3)) * 0.5, "w")
    y = b.node("Conv", [x, w], kernel_shape=[3], pads=[0, 0])  # (1, 4, 6)
    y = b.node("Reshape", [y, b.const(np.array([2, 4, 3], np.int64), "shape")])
    b.output(b.relu(b.bn(y, 4)), "out")
    return b.build("reshape_mixes_channels")


FOLD_CASES: tuple[FoldCase, ...] = (
    FoldCase("linear_bn", linear_bn, ("backward",), 0, "Linear as MatMul(x, Transpose(W)) + b, then BN1d"),
    FoldCase(
        "weight_expression", weight_expression, ("backward", "backward"), 0, "weights as Cast/Reshape/Slice/Concat"
    ),
    FoldCase("bn_before_linear", bn_before_linear, ("forward",), 0, "BN1d on raw features before Linear"),
    FoldCase("keras_conv_relu_bn", keras_conv_relu_bn, ("forward", "forward"), 0, "Conv-ReLU-BN then 1x1 Conv / Dense"),
    FoldCase("inception_concat", inception_concat, ("concat split",), 0, "BN after a channel Concat of 3 convs"),
    FoldCase("crnn_squeeze", crnn_squeeze, ("through shape op",), 0, "Conv2d H=1, Squeeze, BN1d"),
    FoldCase("upsample_decoder", upsample_decoder, ("backward", "forward"), 0, "ConvTranspose-BN; BN-1x1 ConvT"),
    FoldCase("padded_next_conv", padded_next_conv, (), 1, "twin: the next Conv pads with zeros"),
    FoldCase("two_readers", two_readers, (), 2, "twins: two readers of the BN / of the producer"),
    FoldCase("relu_between", relu_between, (), 1, "twin: ReLU on both sides of the BN"),
    FoldCase("concat_spatial_axis", concat_spatial_axis, (), 1, "twin: Concat on axis 2"),
    FoldCase("reshape_mixes_channels", reshape_mixes_channels, (), 1, "twin: a Reshape that moves elements"),
)
