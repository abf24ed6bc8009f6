"""Tiny ONNX graphs for the converter tests, and a way to run them with every ORT optimisation off."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, NodeProto, TensorProto, helper, numpy_helper

from converter.reference import BatchNormParams

LATEST = onnx.defs.onnx_opset_version()


def bn_params(rng: np.random.Generator, c: int, eps: float = 1e-5) -> BatchNormParams:
    """Trained-looking statistics (the oracle's parameter type), exactly representable in float32."""

    def f32(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32).astype(np.float64)

    return BatchNormParams(
        gamma=f32(rng.uniform(0.5, 1.5, c)),
        beta=f32(rng.normal(0, 0.3, c)),
        running_mean=f32(rng.normal(0, 0.5, c)),
        running_var=f32(rng.uniform(0.3, 2.0, c)),
        eps=eps,
    )


def bn_initializers(p: BatchNormParams, prefix: str = "bn", dtype: Any = np.float32) -> list[TensorProto]:
    values = {"scale": p.gamma, "B": p.beta, "mean": p.running_mean, "var": p.running_var}
    return [numpy_helper.from_array(np.asarray(v, dtype), f"{prefix}_{k}") for k, v in values.items()]


def bn_node(x: str, y: str, prefix: str = "bn", eps: float = 1e-5, **attrs: Any) -> NodeProto:
    inputs = [x] + [f"{prefix}_{k}" for k in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix, epsilon=eps, **attrs)


def tensor(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(
    nodes: Sequence[NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str | None] | None]],
    outputs: Sequence[str],
    initializers: Sequence[TensorProto] = (),
    opset: int = 17,
    elem: int = TensorProto.FLOAT,
    ir_version: int | None = None,
) -> ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "test",
        [helper.make_tensor_value_info(n, elem, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs],
        list(initializers),
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version or min(m.ir_version, 10)
    # graph outputs need a type with a shape for onnx.checker; take it from shape inference
    inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(m).graph.output}
    for out in m.graph.output:
        if out.name in inferred and inferred[out.name].type.tensor_type.HasField("shape"):
            out.CopyFrom(inferred[out.name])
        else:
            out.type.tensor_type.shape.SetInParent()
    return m


def run(m: ModelProto, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in sess.run(list(outputs) if outputs else None, feeds)]


def op_types(m: ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def initializer(m: ModelProto, name: str) -> np.ndarray:
    for t in m.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Norm-wise closeness at float32 precision, scaled by the reference's magnitude."""
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return bool(np.max(np.abs(np.asarray(got, np.float64) - want), initial=0.0) <= atol + rtol * scale)
