"""verify.compare semantics, and the Graph index's view of subgraphs and dead values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper

from converter import convert
from converter.errors import InputError
from converter.graph import Graph
from converter.verify import compare, resolve_shapes, session
from tests.converter.graphs import bn_initializers, bn_node, bn_params, model, tensor


def test_compare_is_normwise_relative_to_the_reference_scale() -> None:
    want = np.array([1000.0, 1e-9], np.float32)
    got = np.array([1000.001, 2e-9], np.float32)
    check = compare("y", got, want, atol=1e-6, rtol=1e-5)
    assert check.passed  # the tiny element's 100% relative error is float32 noise at the output's scale
    assert check.max_rel == pytest.approx(check.max_abs / 1000.0)
    assert not compare("y", got * 1.001, want, atol=1e-6, rtol=1e-5).passed


def test_compare_shapes_nans_infinities_and_integers() -> None:
    a = np.array([1.0, np.nan, np.inf])
    same = compare("y", a, a.copy(), 0, 0)  # NaN and infinity prove nothing: flagged, never a pass
    assert not same.passed and (same.nonfinite_original, same.nonfinite_converted) == (2, 2)
    assert compare("y", a[:1], a[:1].copy(), 0, 0).passed
    assert not compare("y", np.array([1.0, 2.0, np.inf]), a, 1, 1).passed
    assert not compare("y", np.array([1.0, np.nan, -np.inf]), a, 1, 1).passed
    assert compare("y", np.zeros((2, 1)), np.zeros(2), 1, 1).max_abs == math.inf
    assert compare("i", np.array([1, 2]), np.array([1, 2]), 0, 0).passed
    assert not compare("i", np.array([1, 3]), np.array([1, 2]), 10, 10).passed


def test_resolve_shapes() -> None:
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["N", 3])], ["y"])
    inputs = session(m).get_inputs()
    assert resolve_shapes(inputs, None) == {"x": [1, 3]}
    assert resolve_shapes(inputs, [4, 3]) == {"x": [4, 3]}
    with pytest.raises(InputError, match="static dim 3 on axis 1"):
        resolve_shapes(inputs, [4, 2])
    with pytest.raises(InputError, match="rank 2"):
        resolve_shapes(inputs, [4])


def test_a_value_read_inside_a_subgraph_blocks_the_fold() -> None:
    rng = np.random.default_rng(0)
    then = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, None)]
    )
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("c", "y"),
        helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=other),
    ]
    inits = [tensor("W", rng.normal(size=(3, 3, 1, 1)).astype(np.float32)), *bn_initializers(bn_params(rng, 3))]
    m = model(nodes, [("x", [1, 3, 2, 2])], ["y"], inits)
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, 2, 2]))
    g = Graph(m)
    assert not g.sole_user("c", 1)
    (record,) = convert(m).report.layers
    assert record.action == "kept" and "other readers" in str(record.reason)


def test_prune_removes_dead_constants_and_identities_only() -> None:
    nodes = [
        helper.make_node("Constant", [], ["k"], value=tensor("kv", np.ones(2, np.float32))),
        helper.make_node("Identity", ["unused_init"], ["dead"]),
        helper.make_node("Relu", ["x"], ["orphan"]),  # a dead node with work in it: not ours to remove
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    m = model(nodes, [("x", [2])], ["y"], [tensor("unused_init", np.ones(2, np.float32))])
    g = Graph(m)
    assert g.prune() == 3
    g.commit()
    assert [n.op_type for n in m.graph.node] == ["Relu", "Identity"]
    assert not m.graph.initializer
