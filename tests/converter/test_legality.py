"""When folding would change a result it must not happen; when parameters hide behind Identity/Constant it must."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from converter import ConversionError, convert
from tests.converter.graphs import (
    bn_initializers,
    bn_node,
    bn_params,
    close,
    initializer,
    model,
    op_types,
    run,
    tensor,
)

RNG = np.random.default_rng(10)
W = RNG.normal(size=(3, 2, 3, 3)).astype(np.float32)
P = bn_params(RNG, 3)
X = RNG.normal(size=(1, 2, 5, 5)).astype(np.float32)


def conv(out: str = "c", w: str = "W", name: str = "conv", x: str = "x") -> object:
    return helper.make_node("Conv", [x, w], [out], name=name, pads=[1, 1, 1, 1])


def kept_reason(result: object, name: str = "bn") -> str:
    (record,) = [r for r in result.report.layers if r.name == name]  # type: ignore[attr-defined]
    assert record.action == "kept", record
    return str(record.reason)


def equal_outputs(before: object, after: object, feeds: dict[str, np.ndarray]) -> None:
    for b, a in zip(run(before, feeds), run(after, feeds), strict=True):  # type: ignore[arg-type]
        assert close(a, b), np.max(np.abs(a - b))


def test_producer_output_with_a_second_reader_is_not_folded() -> None:
    m = model(
        [conv(), bn_node("c", "y"), helper.make_node("Relu", ["c"], ["r"])],
        [("x", [1, 2, 5, 5])],
        ["y", "r"],
        [tensor("W", W), *bn_initializers(P)],
    )
    result = convert(m)
    assert "other readers" in kept_reason(result)
    assert op_types(result.model).count("BatchNormalization") == 1
    equal_outputs(m, result.model, {"x": X})


def test_producer_output_that_is_a_graph_output_is_not_folded() -> None:
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y", "c"], [tensor("W", W), *bn_initializers(P)])
    result = convert(m)
    assert "graph output" in kept_reason(result)
    equal_outputs(m, result.model, {"x": X})


def test_shared_weight_is_cloned_and_the_other_reader_keeps_the_original() -> None:
    m = model(
        [conv("c1", name="conv1"), bn_node("c1", "y"), conv("c2", name="conv2")],
        [("x", [1, 2, 5, 5])],
        ["y", "c2"],
        [tensor("W", W), *bn_initializers(P)],
    )
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    conv1, conv2 = result.model.graph.node
    assert conv2.input[1] == "W" and conv1.input[1] != "W"
    np.testing.assert_array_equal(initializer(result.model, "W"), W)
    equal_outputs(m, result.model, {"x": X})


def test_two_folds_of_one_shared_weight_get_distinct_names() -> None:
    p2 = bn_params(RNG, 3)
    m = model(
        [conv("c1", name="conv1"), bn_node("c1", "y1", "bn1"), conv("c2", name="conv2"), bn_node("c2", "y2", "bn2")],
        [("x", [1, 2, 5, 5])],
        ["y1", "y2"],
        [tensor("W", W), *bn_initializers(P, "bn1"), *bn_initializers(p2, "bn2")],
    )
    result = convert(m)
    assert [r.action for r in result.report.layers] == ["folded", "folded"]
    names = [n.input[1] for n in result.model.graph.node] + [n.input[2] for n in result.model.graph.node]
    assert len(set(names)) == 4
    equal_outputs(m, result.model, {"x": X})


def test_new_names_never_collide_with_existing_ones() -> None:
    taken = tensor("conv_bias_folded", np.ones((3, 1, 1), np.float32))  # the name a bias-free fold would pick
    m = model(
        [conv(), bn_node("c", "y"), helper.make_node("Add", ["y", "conv_bias_folded"], ["z"])],
        [("x", [1, 2, 5, 5])],
        ["z"],
        [tensor("W", W), taken, *bn_initializers(P)],
    )
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    equal_outputs(m, result.model, {"x": X})


def test_batchnorm_parameters_shared_by_two_batchnorms() -> None:
    m = model(
        [conv("c1", name="conv1"), bn_node("c1", "y1"), conv("c2", "W2", name="conv2"), bn_node("c2", "y2")],
        [("x", [1, 2, 5, 5])],
        ["y1", "y2"],
        [tensor("W", W), tensor("W2", W * 2), *bn_initializers(P)],
    )
    m.graph.node[3].name = "bn_b"
    result = convert(m)
    assert [r.action for r in result.report.layers] == ["folded", "folded"]
    assert not [t for t in result.model.graph.initializer if t.name.startswith("bn_")]  # dead parameters removed
    equal_outputs(m, result.model, {"x": X})


def test_non_constant_batchnorm_parameters_are_kept() -> None:
    nodes = [conv(), bn_node("c", "y")]
    inits = [tensor("W", W), *bn_initializers(P)][:-1]  # var comes in as a graph input
    m = model(nodes, [("x", [1, 2, 5, 5]), ("bn_var", [3])], ["y"], inits)
    # random values for the variance input give NaN (negative variances), which verification never passes
    result = convert(m, input_shapes={"x": [1, 2, 5, 5], "bn_var": [3]}, verify=False)
    assert "not constants" in kept_reason(result)


def test_initializer_that_is_also_an_input_is_a_weight_by_default_and_leaves_the_inputs() -> None:
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 2, 3, 3]))
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert result.report.initializer_inputs == ["W"]
    assert any("1 initializer(s) also listed as graph inputs" in n and "(W)" in n for n in result.report.notes)
    equal_outputs(m, result.model, {"x": X})


def test_initializer_that_is_also_an_input_stays_overridable_when_asked() -> None:
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    m.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 2, 3, 3]))
    result = convert(m, keep_overridable_initializers=True)
    reason = kept_reason(result)
    assert "the weight of Conv conv is not a constant ('W' is an initializer also listed as a graph input" in reason
    assert [i.name for i in result.model.graph.input] == ["x", "W"]
    assert result.report.initializer_inputs == []


def test_weight_from_a_graph_input_is_not_folded() -> None:
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5]), ("W", [3, 2, 3, 3])], ["y"], bn_initializers(P))
    result = convert(m)
    assert "not a constant" in kept_reason(result)


def test_parameters_through_identity_chains_and_constant_nodes_fold() -> None:
    """TorchScript puts Identity between initializers and BN; PaddleOCR stores weights in Constant nodes."""
    p_inits = bn_initializers(P)
    nodes = [
        helper.make_node("Constant", [], ["W_const"], value=tensor("Wv", W)),
        helper.make_node("Identity", ["W_const"], ["W_id"]),
        helper.make_node("Identity", ["W_id"], ["W_id2"]),
        conv(w="W_id2"),
    ]
    bn_inputs = ["c"]
    for t in p_inits:
        nodes.append(helper.make_node("Identity", [t.name], [t.name + "_id"]))
        bn_inputs.append(t.name + "_id")
    nodes.append(helper.make_node("BatchNormalization", bn_inputs, ["y"], name="bn"))
    m = model(nodes, [("x", [1, 2, 5, 5])], ["y"], p_inits)
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    assert op_types(result.model) == ["Conv"]  # the Constant and Identity nodes are dead and gone
    equal_outputs(m, result.model, {"x": X})


def test_batchnorm_after_add_is_kept_with_a_reason_and_affine_rewrites_it() -> None:
    nodes = [conv(), helper.make_node("Add", ["c", "c"], ["s"], name="add"), bn_node("s", "y")]
    m = model(nodes, [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    result = convert(m)
    assert "comes from Add" in kept_reason(result)
    affine = convert(m, bn="affine")
    assert affine.report.layers[0].action == "affine"
    assert op_types(affine.model) == ["Conv", "Add", "Mul", "Add"]
    equal_outputs(m, affine.model, {"x": X})


def test_batchnorm_on_a_graph_input_affine_needs_a_known_rank() -> None:
    m = model([bn_node("x", "y")], [("x", [1, 3, 4])], ["y"], bn_initializers(P))
    assert "graph input" in kept_reason(convert(m))
    affine = convert(m, bn="affine")
    assert op_types(affine.model) == ["Mul", "Add"]
    # a Reshape to a shape that arrives at run time, of unknown length: the BN input's rank is unknown
    reshape = helper.make_node("Reshape", ["x", "shape"], ["r"])
    unknown = model([reshape, bn_node("r", "y")], [("x", [1, 3, 4])], ["y"], bn_initializers(P))
    unknown.graph.input.append(helper.make_tensor_value_info("shape", TensorProto.INT64, ["n"]))
    result = convert(unknown, bn="affine", verify=False)
    assert "rank" in kept_reason(result)


@pytest.mark.parametrize("rank", [3, 4])
def test_matmul_whose_output_is_not_2d_is_not_folded(rank: int) -> None:
    shape = [2, 3, 6] if rank == 3 else [2, 3, 5, 6]
    w = RNG.normal(size=(6, 3)).astype(np.float32)  # BN channels (axis 1) = 3 = MatMul's last axis, by accident
    m = model(
        [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"), bn_node("mm", "y")],
        [("x", shape)],
        ["y"],
        [tensor("W", w), *bn_initializers(P)],
    )
    reason = kept_reason(convert(m))
    assert "last axis" in reason and f"input rank {rank}" in reason


def test_used_training_outputs_are_refused() -> None:
    node = helper.make_node(
        "BatchNormalization",
        ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"],
        ["y", "rm", "rv"],
        name="bn",
        training_mode=1,
    )
    m = model([conv(), node], [("x", [1, 2, 5, 5])], ["y", "rm"], [tensor("W", W), *bn_initializers(P)])
    for mode in ("fold", "keep", "affine"):
        with pytest.raises(ConversionError, match=r"bn: .*training mode.*\(rm\) are used"):
            convert(m, bn=mode)


def test_training_mode_with_unused_outputs_becomes_inference_and_says_so() -> None:
    node = helper.make_node(
        "BatchNormalization",
        ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"],
        ["y", "rm", "rv"],
        name="bn",
        training_mode=1,
    )
    m = model([conv(), node], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)])
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    assert "training mode" in result.report.layers[0].notes[0]
    assert result.report.verification is not None
    assert result.report.verification.reference == "the original in inference mode"
    keep = convert(m, bn="keep").model
    (bn,) = keep.graph.node[1:]
    assert list(bn.output) == ["y"] and not [a for a in bn.attribute if a.name == "training_mode"]


@pytest.mark.parametrize("opset", [9, 11, 13, 14, 15, 17, 21, None])
def test_every_batchnorm_opset_folds(opset: int | None) -> None:
    from tests.converter.graphs import LATEST

    version = opset or LATEST
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)], version)
    result = convert(m)
    assert op_types(result.model) == ["Conv"]
    equal_outputs(m, result.model, {"x": X})


def test_opset_9_training_form_with_unused_outputs_is_normalised() -> None:
    node = helper.make_node(
        "BatchNormalization", ["c", "bn_scale", "bn_B", "bn_mean", "bn_var"], ["y", "m1", "v1", "sm", "sv"], name="bn"
    )
    m = model([conv(), node], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(P)], opset=9)
    result = convert(m, bn="keep")
    assert list(result.model.graph.node[1].output) == ["y"]
    assert "training mode" in result.report.layers[0].notes[0]


def test_zero_and_denormal_running_variance_stay_finite() -> None:
    p = bn_params(RNG, 3)
    var = np.array([0.0, 5.6e-45, 1e-38], dtype=np.float32)  # dead, denormal (seen in real models), tiny
    p = type(p)(p.gamma, p.beta, p.running_mean, var.astype(np.float64), eps=1e-5)
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(p)])
    result = convert(m)
    assert result.report.layers[0].action == "folded"
    for t in result.model.graph.initializer:
        from onnx import numpy_helper

        assert np.all(np.isfinite(numpy_helper.to_array(t)))


def test_overflowing_fold_fails_naming_the_layer() -> None:
    p = bn_params(RNG, 3)
    p = type(p)(p.gamma * 1e35, p.beta, p.running_mean, np.zeros(3), eps=1e-12)
    m = model(
        [conv(), bn_node("c", "y", eps=1e-12)], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(p)]
    )
    with pytest.raises(ConversionError, match=r"conv: folded value .* overflows float32"):
        convert(m, verify=False)


def test_negative_variance_plus_epsilon_is_refused() -> None:
    p = bn_params(RNG, 3)
    p = type(p)(p.gamma, p.beta, p.running_mean, np.array([1.0, -1.0, 1.0]))
    m = model([conv(), bn_node("c", "y")], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", W), *bn_initializers(p)])
    with pytest.raises(ConversionError, match=r"bn: running variance \+ epsilon .* channel 1"):
        convert(m)


def test_unsupported_weight_dtype_is_kept() -> None:
    w16 = helper.make_tensor("W", TensorProto.BFLOAT16, W.shape, np.zeros(W.size, np.uint16).tolist())
    inits = [w16, *bn_initializers(P)]
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16), conv(x="xb"), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 2, 5, 5])], ["y"], inits)
    result = convert(m, verify=False)
    assert "bfloat16" in kept_reason(result) or "not a foldable" in kept_reason(result)


def test_batchnorm_inside_an_if_branch_folds_there_and_the_other_branch_keeps_the_shared_weight() -> None:
    def branch(name: str, nodes: list[object], out: str, inits: list[TensorProto]) -> object:
        value = helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 3, 5, 5])
        return helper.make_graph(nodes, name, [], [value], initializer=inits)

    then = branch("then", [conv("c_then"), bn_node("c_then", "y_then")], "y_then", bn_initializers(P))
    other = branch("else", [conv("c_else")], "c_else", [])
    m = model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        [("cond", []), ("x", [1, 2, 5, 5])],
        ["y"],
        [tensor("W", W)],
    )
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.BOOL
    result = convert(m)
    (record,) = result.report.layers
    assert (record.name, record.action, record.into) == ("If(y)/then_branch/bn", "folded", "Conv conv")
    assert result.report.after is not None and result.report.after.batchnorms == 0
    assert [t.name for t in result.model.graph.initializer] == ["W"]  # the else branch still reads it
    for cond in (True, False):
        equal_outputs(m, result.model, {"cond": np.array(cond), "x": X})
