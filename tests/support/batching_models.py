"""Models for the dynamic batching tests: an MLP with two outputs, one whose values can make it fail, one whose
second dimension is dynamic, and one with a fixed batch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.support.servers import _model, save

FEATURES = 16
HIDDEN = 32
CLASSES = 10
TABLE_ROWS = 10


def mlp_model() -> onnx.ModelProto:
    """x [batch, 16] -> Gemm -> BatchNorm -> Relu = hidden [batch, 32] -> Gemm = logits [batch, 10]."""
    rng = np.random.default_rng(7)
    f32 = np.float32
    inits = [
        numpy_helper.from_array(rng.standard_normal((HIDDEN, FEATURES)).astype(f32), "w1"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(f32), "b1"),
        numpy_helper.from_array(rng.uniform(0.5, 2, HIDDEN).astype(f32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(f32), "beta"),
        numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(f32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, HIDDEN).astype(f32), "var"),
        numpy_helper.from_array(rng.standard_normal((CLASSES, HIDDEN)).astype(f32), "w2"),
        numpy_helper.from_array(rng.standard_normal(CLASSES).astype(f32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h0"], transB=1),
        helper.make_node("BatchNormalization", ["h0", "gamma", "beta", "mean", "var"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", HIDDEN]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]),
        ],
        inits,
    )


def gather_model() -> onnx.ModelProto:
    """idx INT64 [batch, 1] -> y = table[idx] [batch, 1, 4]: an index beyond the table makes ONNX Runtime fail."""
    table = np.arange(TABLE_ROWS * 4, dtype=np.float32).reshape(TABLE_ROWS, 4)
    return _model(
        [helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1, 4])],
        [numpy_helper.from_array(table, "table")],
    )


def ragged_model() -> onnx.ModelProto:
    """x [batch, n] -> y = 2x: requests with different n must not share a batch."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return _model(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
        [two],
    )


def fixed_model() -> onnx.ModelProto:
    """x [1, 4] -> y = 2x: no batch dimension to batch on."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return _model(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [two],
    )


def batching(max_batch_size: int, delay_us: int = 0, **extra: object) -> str:
    return json.dumps(
        {"max_batch_size": max_batch_size, "dynamic_batching": {"max_queue_delay_microseconds": delay_us}, **extra}
    )


def build_batching_repository(root: Path, max_batch_size: int = 8) -> Path:
    labels = {"labels": {"logits": [f"class-{i}" for i in range(CLASSES)]}}
    save(mlp_model(), root, "mlp", config=batching(max_batch_size, **labels))
    save(mlp_model(), root, "mlp_plain", config=json.dumps({"max_batch_size": max_batch_size}))
    save(gather_model(), root, "gather", config=batching(max_batch_size))
    save(ragged_model(), root, "ragged", config=batching(max_batch_size))
    save(fixed_model(), root, "fixed", config=batching(max_batch_size))
    return root
