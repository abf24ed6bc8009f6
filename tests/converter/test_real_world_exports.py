"""Exports as real models come: constant expressions of any standard op, initializers listed as graph inputs,
nodes out of order. Each kept BatchNorm's reason names its real cause."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from converter import ConversionError, consteval, convert
from converter.cli import main
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor

RNG = np.random.default_rng(24)
W = RNG.normal(size=(3, 2, 3, 3)).astype(np.float32)
P = bn_params(RNG, 3)
X = RNG.normal(size=(1, 2, 5, 5)).astype(np.float32)


def conv(w: str = "W", x: str = "x", out: str = "c", name: str = "conv") -> onnx.NodeProto:
    return helper.make_node("Conv", [x, w], [out], name=name, pads=[1, 1, 1, 1])


def kept(result: object) -> str:
    (record,) = result.report.layers  # type: ignore[attr-defined]
    assert record.action == "kept", record
    return str(record.reason)


def weight_from(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = 17) -> onnx.ModelProto:
    """Conv(weight "Wx" made by ``nodes``) → BN."""
    return model(
        [*nodes, conv("Wx"), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [*inits, *bn_initializers(P)], opset
    )


# -------------------------------------------------------------------------------- constant expressions fold
def test_weight_built_by_constant_of_shape_expand_and_arithmetic_folds_and_the_expression_is_pruned() -> None:
    fill = helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=fill),
        helper.make_node("Expand", ["row", "shape"], ["rows"]),
        helper.make_node("Mul", ["ones", "rows"], ["Wx"]),
    ]
    row = RNG.normal(size=(1, 1, 1, 3)).astype(np.float32)
    m = weight_from(nodes, [tensor("shape", np.array([3, 2, 3, 3], np.int64)), tensor("row", row)])
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    assert op_types(result.model) == ["Conv"]  # ConstantOfShape, Expand, Mul and their inputs are dead and gone
    assert {t.name for t in result.model.graph.initializer} == set(result.model.graph.node[0].input[1:])
    assert close(run(result.model, {"x": X})[0], run(m, {"x": X})[0])


def test_shape_of_an_activation_with_a_static_shape_is_a_constant_and_not_a_reader() -> None:
    """caffe2-style: BN's scale is ConstantOfShape(Gather(Shape(conv output))); the Shape must not block the fold."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.5])
    nodes = [
        conv(),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "axis"], ["channels"], axis=0),
        helper.make_node("ConstantOfShape", ["channels"], ["bn_scale"], value=one),
        bn_node("c", "y"),
    ]
    inits = [tensor("W", W), tensor("axis", np.array([1], np.int64)), *bn_initializers(P)[1:]]
    m = model(nodes, [("x", [1, 2, 5, 5])], ["y"], inits)
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    assert op_types(result.model) == ["Conv"]
    assert close(run(result.model, {"x": X})[0], run(m, {"x": X})[0])


# ------------------------------------------------------------------------------------- each cause, named
def test_reason_names_a_graph_input_behind_an_expression() -> None:
    nodes = [helper.make_node("Identity", ["w_in"], ["Wx"])]
    m = model(
        [*nodes, conv("Wx"), bn_node("c", "y")],
        [("x", [1, 2, 5, 5]), ("w_in", [3, 2, 3, 3])],
        ["y"],
        bn_initializers(P),
    )
    assert "the weight of Conv conv is not a constant ('w_in' is a graph input)" in kept(convert(m))


def test_reason_names_the_shape_of_a_dynamic_activation() -> None:
    nodes = [
        conv(),
        helper.make_node("Shape", ["c"], ["shape"]),
        helper.make_node("Gather", ["shape", "axis"], ["channels"], axis=0),
        helper.make_node("Expand", ["gamma", "channels"], ["bn_scale"]),
        bn_node("c", "y"),
    ]
    inits = [tensor("W", W), tensor("axis", np.array([1], np.int64)), tensor("gamma", np.array([1.5], np.float32))]
    m = model(nodes, [("x", ["N", 2, 5, 5])], ["y"], [*inits, *bn_initializers(P)[1:]])
    reason = kept(convert(m, input_shapes={"x": [1, 2, 5, 5]}))
    assert "parameters are not constants (scale: 'shape' is the shape of 'c', which is not static)" in reason


def test_reason_names_a_custom_domain_op() -> None:
    m = weight_from([helper.make_node("Identity", ["seed"], ["Wx"])], [tensor("seed", W)])
    m.graph.node[0].op_type, m.graph.node[0].domain = "Fill", "com.example"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    reason = kept(convert(m, verify=False))
    assert "'Wx' is computed by com.example.Fill, outside the standard ONNX domain" in reason


def test_reason_names_a_random_op() -> None:
    nodes = [helper.make_node("RandomNormal", [], ["Wx"], shape=[3, 2, 3, 3])]
    reason = kept(convert(weight_from(nodes, []), verify=False))
    assert "'Wx' is computed by RandomNormal, which draws random values" in reason


def test_reason_names_the_size_bound_and_nothing_that_big_is_allocated() -> None:
    big = [3, consteval.MAX_ELEMENTS, 1, 1]  # 3 × 2^27 elements: over the bound before it is ever made
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["Wx"])]
    reason = kept(convert(weight_from(nodes, [tensor("shape", np.array(big, np.int64))]), verify=False))
    assert f"which would make {3 * consteval.MAX_ELEMENTS:,} elements" in reason
    assert f"above the constant-evaluation bound of {consteval.MAX_ELEMENTS:,}" in reason


def test_reason_names_an_op_no_runtime_can_evaluate() -> None:
    nodes = [helper.make_node("Add", ["a", "b"], ["Wx"])]  # shapes that do not broadcast: a malformed node
    a = tensor("a", RNG.normal(size=(3, 2, 3, 3)).astype(np.float32))
    b = tensor("b", RNG.normal(size=(5,)).astype(np.float32))
    m = weight_from(nodes, [a, b])
    result = convert(m, verify=False)
    assert "which neither ONNX Runtime nor the ONNX reference evaluator could run" in kept(result)


def test_reason_names_an_overridable_initializer_kept_as_asked() -> None:
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    m.graph.input.extend(
        helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in bn_initializers(P)
    )
    reason = kept(convert(m, keep_overridable_initializers=True))
    assert reason == (
        "parameters are not constants (scale 'bn_scale', B 'bn_B', mean 'bn_mean', var 'bn_var': each is an "
        "initializer also listed as a graph input, kept overridable (keep_overridable_initializers))"
    )


# ------------------------------------------------------------------------------- initializers as inputs
def test_ir3_model_lists_its_initializers_as_inputs_and_is_written_as_ir4_with_the_real_inputs_only() -> None:
    inits = [tensor("W", W), *bn_initializers(P)]
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], inits, opset=8, ir_version=3)
    m.graph.input.extend(helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits)
    result = convert(m, keep_overridable_initializers=True)  # IR 3 has no overridable initializers
    assert result.report.layers[0].action == "folded"
    assert result.model.ir_version == 4 and [i.name for i in result.model.graph.input] == ["x"]
    assert any(n.startswith("IR 3 model: its 5 initializer(s)") for n in result.report.notes)
    onnx.checker.check_model(result.model)


def test_command_line_keeps_overridable_initializers_when_asked(tmp_path: object, capsys: object) -> None:
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 2, 3, 3]))
    src = tmp_path / "m.onnx"  # type: ignore[operator]
    onnx.save(m, str(src))
    assert main(["convert", str(src), "-o", str(tmp_path / "a.onnx")]) == 0  # type: ignore[operator]
    assert "folded" in capsys.readouterr().out  # type: ignore[attr-defined]
    argv = ["convert", str(src), "-o", str(tmp_path / "b.onnx"), "--keep-overridable-initializers"]  # type: ignore[operator]
    assert main(argv) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "kept" in out and "kept overridable" in out


# ---------------------------------------------------------------------------------------------- sorting
def unsorted() -> onnx.ModelProto:
    m = model(
        [conv(), bn_node("c", "y"), helper.make_node("Relu", ["y"], ["r"])],
        [("x", [1, 2, 5, 5])],
        ["r"],
        [tensor("W", W), *bn_initializers(P)],
    )
    nodes = list(m.graph.node)
    m.graph.ClearField("node")
    m.graph.node.extend(reversed(nodes))
    return m


def test_unsorted_graph_is_sorted_folded_and_written_sorted(tmp_path: object, capsys: object) -> None:
    m = unsorted()
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(m)
    before = m.SerializeToString()
    result = convert(m)
    assert m.SerializeToString() == before  # the caller's model is left as it was
    assert result.report.layers[0].action == "folded"
    assert any("not in topological order: sorted" in n for n in result.report.notes)
    onnx.checker.check_model(result.model)
    assert close(run(result.model, {"x": X})[0], run(m, {"x": X})[0])
    src, dst = tmp_path / "u.onnx", tmp_path / "s.onnx"  # type: ignore[operator]
    onnx.save(m, str(src))
    assert main(["convert", str(src), "-o", str(dst)]) == 0
    assert "sorted as ONNX Runtime sorts them" in capsys.readouterr().out  # type: ignore[attr-defined]
    onnx.checker.check_model(str(dst))


def test_graph_output_without_a_shape_gets_the_inferred_one_and_folds(tmp_path: object, capsys: object) -> None:
    m = model([conv(), bn_node("c", "y")], [("x", ["n", 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    m.graph.output[0].type.tensor_type.ClearField("shape")  # as hand-edited graphs have it: ONNX Runtime runs it
    with pytest.raises(onnx.checker.ValidationError, match="'shape' of 'type' is required"):
        onnx.checker.check_model(m)
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    assert any("declared without a shape" in n and n.endswith(": y") for n in result.report.notes)
    dims = result.model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["n", 3, 5, 5]
    assert close(run(result.model, {"x": X})[0], run(m, {"x": X})[0])
    src, dst = tmp_path / "shapeless.onnx", tmp_path / "folded.onnx"  # type: ignore[operator]
    onnx.save(m, str(src))
    assert main(["convert", str(src), "-o", str(dst)]) == 0
    assert "given their inferred shapes: y" in capsys.readouterr().out  # type: ignore[attr-defined]
    onnx.checker.check_model(str(dst))


def test_a_cycle_is_refused_naming_the_node_by_index_and_op_type_when_unnamed(tmp_path: object, capsys: object) -> None:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="loop_back"),
    ]
    m = model(nodes, [("x", [1, 2])], ["b"], [])
    with pytest.raises(ConversionError, match=r"cycle through node 0 \(Add, unnamed\)"):
        convert(m)
    src = tmp_path / "cycle.onnx"  # type: ignore[operator]
    onnx.save(m, str(src))
    assert main(["convert", str(src), "-o", str(tmp_path / "o.onnx")]) == 2  # type: ignore[operator]
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "cycle through node 0 (Add, unnamed)" in err and "Traceback" not in err


def test_a_value_nothing_produces_is_refused_naming_the_node() -> None:
    nodes = [helper.make_node("Relu", ["ghost"], ["r"], name="reader"), helper.make_node("Relu", ["x"], ["y"])]
    m = model(nodes, [("x", [1, 2])], ["y", "r"], [])
    m.graph.node.reverse()  # unsorted, so the checker's complaint is sorting and bnfold sorts
    with pytest.raises(ConversionError, match="node 'reader' reads 'ghost', which no node, graph input or"):
        convert(m)


def test_a_body_batchnorm_reading_the_enclosing_graph_stays_and_says_why() -> None:
    then = helper.make_graph(
        [bn_node("c", "y_then")], "then", [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["y_else"])],
        "else",
        [],
        [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
    )
    nodes = [conv(), helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    m = model(nodes, [("cond", []), ("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.BOOL
    result = convert(m)
    (record,) = result.report.layers
    assert record.name == "branch/then_branch/bn" and record.action == "kept"
    assert "its input comes from the graph enclosing its If/Loop/Scan body" in str(record.reason)


def test_a_loop_body_folds_and_keeps_no_stale_value_info() -> None:
    w = RNG.normal(size=(2, 2, 3, 3)).astype(np.float32)
    p = bn_params(RNG, 2)
    carried = [
        helper.make_tensor_value_info("i", TensorProto.INT64, []),
        helper.make_tensor_value_info("go", TensorProto.BOOL, []),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 2, 5, 5]),
    ]
    body = helper.make_graph(
        [conv("Wb", "h", "hc"), bn_node("hc", "hn"), helper.make_node("Identity", ["go"], ["go_out"])],
        "body",
        carried,
        [
            helper.make_tensor_value_info("go_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 2, 5, 5]),
        ],
        [tensor("Wb", w), *bn_initializers(p)],
        value_info=[helper.make_tensor_value_info("hc", TensorProto.FLOAT, [1, 2, 5, 5])],
    )
    loop = helper.make_node("Loop", ["n", "go0", "x"], ["y"], name="loop", body=body)
    m = model([loop], [("x", [1, 2, 5, 5])], ["y"], [tensor("n", np.array(3, np.int64)), tensor("go0", np.array(True))])
    result = convert(m)
    assert [(r.name, r.action) for r in result.report.layers] == [("loop/body/bn", "folded")]
    (folded_body,) = [a.g for a in result.model.graph.node[0].attribute if a.name == "body"]
    assert [n.op_type for n in folded_body.node] == ["Conv", "Identity"]
    assert [vi.name for vi in folded_body.value_info] == []  # 'hc' is gone: the Conv writes 'hn' now
    onnx.checker.check_model(result.model)
    assert close(run(result.model, {"x": X})[0], run(m, {"x": X})[0])
