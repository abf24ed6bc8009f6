"""Constant expressions: the whitelisted evaluator agrees with onnx's reference evaluator, op by op and opset by
opset; a weight reached through one folds; an initializer that is also a graph input stays non-constant."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from converter import consteval, convert
from converter.graph import Graph
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor

RNG = np.random.default_rng(5)
A = RNG.normal(size=(2, 3, 4)).astype(np.float32)
I64 = np.int64

# (op, attributes, extra constant inputs after A, opsets)
CASES = [
    ("Identity", {}, [], [13]),
    ("Transpose", {"perm": [2, 0, 1]}, [], [13]),
    ("Transpose", {}, [], [13]),
    ("Reshape", {}, [np.array([0, -1], I64)], [13, 14]),
    ("Reshape", {}, [np.array([4, 6], I64)], [13]),
    ("Unsqueeze", {"axes": [0, -1]}, [], [11]),
    ("Unsqueeze", {}, [np.array([1, -1], I64)], [13]),
    ("Squeeze", {}, [], [13]),
    ("Flatten", {"axis": 2}, [], [13]),
    ("Flatten", {"axis": -1}, [], [13]),
    ("Cast", {"to": TensorProto.FLOAT16}, [], [13]),
    ("Cast", {"to": TensorProto.INT32}, [], [13]),
    ("Concat", {"axis": 1}, [A[:, :2] * 2], [13]),
    (
        "Slice",
        {},
        [np.array([1, -1], I64), np.array([3, -5], I64), np.array([2, 1], I64), np.array([1, -1], I64)],
        [13],
    ),
    ("Slice", {}, [np.array([-100], I64), np.array([100], I64)], [13]),
    ("Slice", {"starts": [1], "ends": [3], "axes": [2]}, [], [9]),
    ("Gather", {"axis": 2}, [np.array([[3, -1], [0, 1]], I64)], [13]),
    ("Gather", {}, [np.array(1, I64)], [13]),
]


@pytest.mark.parametrize(("op", "attrs", "extra", "opsets"), CASES, ids=lambda v: str(v)[:30])
def test_evaluator_matches_onnx_reference(op: str, attrs: dict, extra: list[np.ndarray], opsets: list[int]) -> None:
    data = A[:, :1] if op == "Squeeze" else A
    for opset in opsets:
        names = ["a"] + [f"k{i}" for i in range(len(extra))]
        node = helper.make_node(op, names, ["y"], **attrs)
        inits = [tensor("a", data)] + [tensor(n, v) for n, v in zip(names[1:], extra, strict=True)]
        graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)])
        graph.initializer.extend(inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        (want,) = ReferenceEvaluator(m).run(None, {})
        got = consteval.evaluate(node, [data, *extra], opset)
        assert got is not None
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        # and through the graph index: the same value, read as a constant
        assert np.array_equal(Graph(m).constant("y"), want)  # type: ignore[arg-type]


def test_ops_outside_the_whitelist_and_unreadable_inputs_are_not_constant() -> None:
    assert consteval.evaluate(helper.make_node("Relu", ["a"], ["y"]), [A], 17) is None
    assert consteval.evaluate(helper.make_node("Transpose", ["a"], ["y"]), [None], 17) is None
    assert consteval.evaluate(helper.make_node("Cast", ["a"], ["y"], to=TensorProto.BFLOAT16), [A], 17) is None
    assert consteval.evaluate(helper.make_node("Gather", ["a", "i"], ["y"]), [A, np.array([5], I64)], 17) is None


def linear_bn(weight_is_input: bool = False) -> tuple[object, dict[str, np.ndarray]]:
    """nn.Linear as MatMul(x, Transpose(W)) + b, then BatchNorm1d."""
    w = RNG.normal(size=(4, 6)).astype(np.float32)
    b = RNG.normal(size=4).astype(np.float32)
    p = bn_params(RNG, 4)
    nodes = [
        helper.make_node("Identity", ["W"], ["W_id"]),
        helper.make_node("Transpose", ["W_id"], ["Wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "Wt"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "b"], ["lin"], name="fc_add"),
        bn_node("lin", "y"),
    ]
    m = model(nodes, [("x", [3, 6])], ["y"], [tensor("W", w), tensor("b", b), *bn_initializers(p)])
    if weight_is_input:
        m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [4, 6]))
    s = p.gamma / np.sqrt(p.running_var + p.eps)
    return m, {"w": w, "b": b, "s": s, "t": p.beta - p.running_mean * s}


def test_weight_through_transpose_folds_with_the_closed_form_and_the_transpose_is_pruned() -> None:
    m, v = linear_bn()
    result = convert(m)
    assert [r.action for r in result.report.layers] == ["folded"]
    assert op_types(result.model) == ["MatMul", "Add"]
    consts = {t.name: t for t in result.model.graph.initializer}
    from onnx import numpy_helper

    mm, add = result.model.graph.node
    w64 = v["w"].astype(np.float64).T
    np.testing.assert_array_equal(numpy_helper.to_array(consts[mm.input[1]]), (w64 * v["s"]).astype(np.float32))
    np.testing.assert_array_equal(
        numpy_helper.to_array(consts[add.input[1]]), (v["s"] * v["b"].astype(np.float64) + v["t"]).astype(np.float32)
    )
    assert "W" not in consts  # the original weight and its Transpose are dead and gone
    x = RNG.normal(size=(3, 6)).astype(np.float32)
    assert close(run(result.model, {"x": x})[0], run(m, {"x": x})[0])


def test_an_overridable_initializer_kept_as_asked_stays_non_constant_through_an_expression() -> None:
    m, _ = linear_bn(weight_is_input=True)
    result = convert(m, keep_overridable_initializers=True)
    (record,) = result.report.layers
    assert record.action == "kept" and "weight of MatMul fc is not a constant" in str(record.reason)
    assert "kept overridable (keep_overridable_initializers)" in str(record.reason)
    assert convert(m).report.layers[0].action == "folded"  # by default it is the weight it is
