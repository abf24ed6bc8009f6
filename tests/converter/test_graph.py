"""converter.graph's reader queries, which every fold and the TensorFlow rewrites use to decide that a value may
be changed: a value has a sole reader only when nothing else can see it."""

from __future__ import annotations

from onnx import NodeProto, TensorProto, helper

from converter.graph import Graph, int_attribute
from tests.converter.graphs import model


def _graph(nodes: list[NodeProto], outputs: list[str]) -> Graph:
    return Graph(model(nodes, [("x", [1, 2])], outputs))


def test_the_one_standard_reader_is_the_sole_reader() -> None:
    g = _graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])], ["y"])
    assert g.sole_reader("a") == 1
    assert g.sole_reader("a", once=True) == 1


def test_no_sole_reader_for_a_graph_output_or_two_readers() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["y"]),
        helper.make_node("Abs", ["y"], ["z"]),
        helper.make_node("Neg", ["y"], ["w"]),
    ]
    g = _graph(nodes, ["a", "z", "w"])
    assert g.sole_reader("a") is None  # read by Neg, but also a graph output
    assert g.sole_reader("y") is None  # two readers


def _unchecked(nodes: list[NodeProto], outputs: list[str]) -> Graph:
    """A graph built without shape inference (which knows no custom domain)."""
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    return Graph(helper.make_model(helper.make_graph(nodes, "g", [x], values)))


def test_no_sole_reader_for_a_custom_domain_node_or_a_subgraph() -> None:
    custom = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    assert _unchecked([custom], ["y"]).sole_reader("x") is None
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, None)
    body = helper.make_graph([helper.make_node("Identity", ["x"], ["b"])], "body", [], [b])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body),
    ]
    assert _unchecked(nodes, ["y"]).sole_reader("x") is None  # read inside the If's branches
    relu = helper.make_node("Relu", ["x"], ["y"])
    assert _unchecked([relu], ["y"]).sole_reader("x") == 0


def test_once_refuses_a_reader_that_reads_the_value_twice() -> None:
    g = _graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Add", ["a", "a"], ["y"])], ["y"])
    assert g.sole_reader("a") == 1
    assert g.sole_reader("a", once=True) is None


def test_int_attribute_falls_back_to_the_default() -> None:
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=4, dilations=[1, 1])
    assert int_attribute(node, "group", 1) == 4
    assert int_attribute(node, "axis", 7) == 7
    assert int_attribute(node, "dilations", 1) == 1  # a list is not an int
