"""converter.frontends.tensorflow_patterns on hand-built graphs of tf2onnx's forms (no TensorFlow needed): the
rewrites are exact and bring the per-channel Mul/Add where the standard rules fold it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

from converter import convert
from converter.frontends import tensorflow_patterns

RNG = np.random.default_rng(0)


def make(nodes: list[object], x_shape: list[int], y_shape: list[int], consts: dict[str, np.ndarray]) -> ModelProto:
    graph = helper.make_graph(
        nodes,  # type: ignore[arg-type]
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def ops(model: ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def check(model: ModelProto, x: np.ndarray, canonical: list[str], folded: list[str]) -> None:
    before = run(model, x)
    work = ModelProto()
    work.CopyFrom(model)
    tensorflow_patterns.canonicalise(work)
    assert ops(work) == canonical
    np.testing.assert_allclose(run(work, x), before, rtol=0, atol=0)  # only elementwise work was reordered
    result = convert(work)
    assert ops(result.model) == folded
    assert np.abs(run(result.model, x) - before).max() <= 1e-5 * np.abs(before).max()


def test_nhwc_mul_add_after_transpose() -> None:
    consts = {"w": RNG.standard_normal((4, 3, 3, 3)), "b": RNG.standard_normal(4)}
    consts |= {"s": RNG.uniform(0.5, 2, 4), "t": RNG.standard_normal(4)}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"]),
        helper.make_node("Transpose", ["c"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Mul", ["nhwc", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    model = make(nodes, [2, 3, 6, 6], [2, 4, 4, 4], consts)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    check(model, x, ["Conv", "Mul", "Add", "Transpose"], ["Conv", "Transpose"])


def test_conv1d_squeeze() -> None:
    consts = {"w": RNG.standard_normal((4, 3, 1, 3)), "s": RNG.uniform(0.5, 2, (1, 4, 1)), "t": RNG.standard_normal(4)}
    consts["axes"] = np.array([2])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Squeeze", ["c", "axes_i"], ["sq"]),
        helper.make_node("Mul", ["sq", "s"], ["m"]),
        helper.make_node("Transpose", ["m"], ["nlc"], perm=[0, 2, 1]),
        helper.make_node("Add", ["nlc", "t"], ["y"]),
    ]
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes_i")
    model = make(nodes, [2, 3, 1, 8], [2, 6, 4], {k: v for k, v in consts.items() if k != "axes"})
    model.graph.initializer.append(axes)
    x = RNG.standard_normal((2, 3, 1, 8)).astype(np.float32)
    check(model, x, ["Conv", "Mul", "Add", "Squeeze", "Transpose"], ["Conv", "Squeeze", "Transpose"])


def test_dense_matmul_bias_becomes_gemm() -> None:
    consts = {"w": RNG.standard_normal((6, 5)), "b": RNG.standard_normal(5)}
    consts |= {"s": RNG.uniform(0.5, 2, 5), "t": RNG.standard_normal(5)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["d"]),
        helper.make_node("Mul", ["d", "s"], ["m"]),
        helper.make_node("Add", ["m", "t"], ["y"]),
    ]
    model = make(nodes, [3, 6], [3, 5], consts)
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    before = run(model, x)
    work = ModelProto()
    work.CopyFrom(model)
    assert tensorflow_patterns.canonicalise(work) == {"moved": 0, "gemm": 1}
    assert ops(work) == ["Gemm", "Mul", "Add"]
    np.testing.assert_allclose(run(work, x), before, rtol=1e-6, atol=1e-6)
    result = convert(work)
    assert ops(result.model) == ["Gemm"]
    assert np.abs(run(result.model, x) - before).max() <= 1e-5 * np.abs(before).max()


def test_unsqueeze_that_would_broadcast_is_left() -> None:
    """A constant with size > 1 on an axis Unsqueeze inserts broadcasts there: moving it would change the shape."""
    consts = {"w": RNG.standard_normal((4, 3, 3)), "s": RNG.uniform(0.5, 2, (1, 4, 3, 1))}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("Unsqueeze", ["c", "axes"], ["u"]),
        helper.make_node("Mul", ["u", "s"], ["y"]),
    ]
    model = make(nodes, [2, 3, 8], [2, 4, 3, 6], consts)
    model.graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "axes"))
    assert tensorflow_patterns.canonicalise(model) == {"moved": 0, "gemm": 0}
    assert ops(model) == ["Conv", "Unsqueeze", "Mul"]
