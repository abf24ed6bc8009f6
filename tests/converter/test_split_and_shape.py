"""A BatchNorm after a channel-axis Concat splits into the Concat's producers; one behind channel-keeping
Squeeze/Unsqueeze/Reshape/Flatten folds into the producer. Closed-form values and ONNX Runtime before vs after."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import ModelProto, helper, numpy_helper

from converter import convert
from converter import reference as ref
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor

RNG = np.random.default_rng(40)


def values(m: ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def by_name(m: ModelProto, name: str) -> object:
    (node,) = [n for n in m.graph.node if n.name == name]
    return node


def only_record(m: ModelProto, **kw: object) -> tuple[object, ModelProto]:
    result = convert(m, **kw)  # type: ignore[arg-type]
    (record,) = result.report.layers
    return record, result.model


def same_outputs(a: ModelProto, b: ModelProto, shape: list[int]) -> None:
    x = RNG.normal(size=shape).astype(np.float32)
    got, want = run(b, {"x": x})[0], run(a, {"x": x})[0]
    assert close(got, want), np.max(np.abs(got - want))


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_split_closed_form_into_conv_and_conv_transpose(axis: int) -> None:
    wa = RNG.normal(size=(3, 2, 1, 1)).astype(np.float32)
    ba = RNG.normal(size=3).astype(np.float32)
    wb = RNG.normal(size=(2, 4, 1, 1)).astype(np.float32)  # ConvTranspose: (C_in, C_out, k, k), 4 output channels
    p = bn_params(RNG, 7)
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "ba"], ["a"], name="a"),
        helper.make_node("ConvTranspose", ["x", "Wb"], ["b"], name="b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=axis),
        bn_node("cat", "y"),
    ]
    inits = [tensor("Wa", wa), tensor("ba", ba), tensor("Wb", wb), *bn_initializers(p)]
    m = model(nodes, [("x", [2, 2, 4, 4])], ["y"], inits)
    record, folded = only_record(m)
    assert record.action == "folded" and str(record.fold) == "concat split"  # type: ignore[attr-defined]
    assert op_types(folded) == ["Conv", "ConvTranspose", "Concat"]
    s, t = ref.affine(p)
    got = values(folded)
    a, b = by_name(folded, "a"), by_name(folded, "b")
    np.testing.assert_array_equal(got[a.input[1]], (wa.astype(np.float64) * s[:3, None, None, None]).astype(np.float32))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got[a.input[2]], (s[:3] * ba.astype(np.float64) + t[:3]).astype(np.float32))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got[b.input[1]], (wb.astype(np.float64) * s[None, 3:, None, None]).astype(np.float32))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got[b.input[2]], t[3:].astype(np.float32))  # type: ignore[attr-defined]
    same_outputs(m, folded, [2, 2, 4, 4])


def concat_of(second: list[object], channels: int, outputs: list[str] | None = None) -> ModelProto:
    p = bn_params(RNG, channels)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="a"),
        *second,
        helper.make_node("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
        bn_node("cat", "y"),
    ]
    w = tensor("W", RNG.normal(size=(3, 2, 1, 1)).astype(np.float32))
    return model(nodes, [("x", [1, 2, 3, 3])], outputs or ["y"], [w, *bn_initializers(p)])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("second", "channels", "outputs", "reason"),
    [
        ([helper.make_node("Relu", ["x"], ["b"], name="relu")], 5, None, "input 1 of Concat cat comes from Relu relu"),
        (
            [helper.make_node("Conv", ["x", "W"], ["b"], name="c2")],
            6,
            ["y", "b"],
            "input 1 of Concat cat: the output of Conv c2 has other readers",
        ),
        ([helper.make_node("Identity", ["x"], ["b"])], 5, None, "comes from Identity"),
    ],
)
def test_concat_with_an_input_that_cannot_absorb_its_part_keeps_the_batchnorm(
    second: list[object], channels: int, outputs: list[str] | None, reason: str
) -> None:
    m = concat_of(second, channels, outputs)
    record, after = only_record(m)
    assert record.action == "kept" and reason in str(record.reason), record  # type: ignore[attr-defined]
    same_outputs(m, after, [1, 2, 3, 3])


def test_concat_reading_one_value_twice_is_kept() -> None:
    p = bn_params(RNG, 6)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["a"], name="a"),
        helper.make_node("Concat", ["a", "a"], ["cat"], name="cat", axis=1),
        bn_node("cat", "y"),
    ]
    m = model(
        nodes,
        [("x", [1, 2, 3, 3])],
        ["y"],
        [tensor("W", RNG.normal(size=(3, 2, 1, 1)).astype(np.float32)), *bn_initializers(p)],
    )
    record, _ = only_record(m)
    assert record.action == "kept" and "reads one value twice" in str(record.reason)  # type: ignore[attr-defined]


def test_crnn_squeeze_closed_form() -> None:
    w = RNG.normal(size=(5, 3, 2, 3)).astype(np.float32)
    p = bn_params(RNG, 5)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[0, 1, 0, 1]),  # (2, 5, 1, 8)
        helper.make_node("Squeeze", ["c", "axes"], ["sq"], name="sq"),
        bn_node("sq", "y"),
    ]
    m = model(nodes, [("x", [2, 3, 2, 8])], ["y"], [tensor("W", w), tensor("axes", np.array([2])), *bn_initializers(p)])
    record, folded = only_record(m)
    assert str(record.fold) == "through shape op" and record.into == "Conv conv through Squeeze sq"  # type: ignore[attr-defined]
    assert op_types(folded) == ["Conv", "Squeeze"]
    s, t = ref.affine(p)
    conv = by_name(folded, "conv")
    got = values(folded)
    np.testing.assert_array_equal(
        got[conv.input[1]], (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
    )  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got[conv.input[2]], t.astype(np.float32))  # type: ignore[attr-defined]
    same_outputs(m, folded, [2, 3, 2, 8])


@pytest.mark.parametrize("op", ["Unsqueeze", "Reshape", "Flatten"])
def test_gemm_and_conv_through_unsqueeze_reshape_flatten(op: str) -> None:
    p = bn_params(RNG, 4)
    if op == "Flatten":  # SE-style: a 1×1 conv on a 1×1 map, flattened, BatchNorm1d
        producer = helper.make_node("Conv", ["x", "W"], ["c"], name="prod")
        w, shape = RNG.normal(size=(4, 3, 1, 1)).astype(np.float32), [2, 3, 1, 1]
        shaper = helper.make_node("Flatten", ["c"], ["r"], name="shape_op")
        extra = []
    else:  # Gemm (N, 4) → (N, 4, 1) → BN over 4 channels
        producer = helper.make_node("Gemm", ["x", "W"], ["c"], name="prod", transB=1)
        w, shape = RNG.normal(size=(4, 3)).astype(np.float32), [2, 3]
        ins = ["c", "k"]
        shaper = helper.make_node(op, ins, ["r"], name="shape_op")
        extra = [tensor("k", np.array([2]) if op == "Unsqueeze" else np.array([0, 4, 1]))]
    m = model(
        [producer, shaper, bn_node("r", "y")], [("x", shape)], ["y"], [tensor("W", w), *extra, *bn_initializers(p)]
    )
    record, folded = only_record(m)
    assert record.action == "folded" and str(record.fold) == "through shape op", record  # type: ignore[attr-defined]
    same_outputs(m, folded, shape)


def test_matmul_plus_bias_through_reshape() -> None:
    p = bn_params(RNG, 4)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "bias"], ["lin"], name="add"),
        helper.make_node("Reshape", ["lin", "k"], ["r"], name="r"),
        bn_node("r", "y"),
    ]
    inits = [
        tensor("W", RNG.normal(size=(5, 4)).astype(np.float32)),
        tensor("bias", RNG.normal(size=4).astype(np.float32)),
        tensor("k", np.array([6, 4, 1])),
        *bn_initializers(p),
    ]
    m = model(nodes, [("x", [6, 5])], ["y"], inits)
    record, folded = only_record(m)
    assert record.action == "folded" and record.into == "MatMul mm through Reshape r", record  # type: ignore[attr-defined]
    assert op_types(folded) == ["MatMul", "Add", "Reshape"]
    same_outputs(m, folded, [6, 5])


@pytest.mark.parametrize("width", ["W", 5])
def test_squeeze_after_the_channel_axis_keeps_channels_even_with_symbolic_sizes(width: str | int) -> None:
    p = bn_params(RNG, 4)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Squeeze", ["c", "axes"], ["sq"], name="sq"),
        bn_node("sq", "y"),
    ]
    inits = [
        tensor("W", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)),
        tensor("axes", np.array([-2])),
        *bn_initializers(p),
    ]
    m = model(nodes, [("x", ["N", 3, 1, width])], ["y"], inits)
    record, folded = only_record(m, verify=False)  # no input shape given: N (and W) stay symbolic
    assert record.action == "folded" and str(record.fold) == "through shape op", record  # type: ignore[attr-defined]
    same_outputs(m, folded, [2, 3, 1, 5])


def test_a_reshape_with_unknown_static_shapes_cannot_prove_the_channel_mapping() -> None:
    p = bn_params(RNG, 4)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["r"], name="r"),
        bn_node("r", "y"),
    ]
    inits = [
        tensor("W", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)),
        tensor("shape", np.array([0, 4, -1])),
        *bn_initializers(p),
    ]
    m = model(nodes, [("x", ["N", 3, 2, "W"])], ["y"], inits)
    record, _ = only_record(m, input_shapes={"x": [1, 3, 2, 5]}, verify=False)
    assert record.action == "folded"  # with the input shape given, the shapes prove it
    record, _ = only_record(m, verify=False)
    reason = str(record.reason)  # type: ignore[attr-defined]
    assert record.action == "kept" and "static shapes needed to prove it keeps channels are unknown" in reason  # type: ignore[attr-defined]


def test_shape_op_with_a_second_reader_is_kept() -> None:
    p = bn_params(RNG, 4)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Squeeze", ["c", "axes"], ["sq"], name="sq"),
        bn_node("sq", "y"),
    ]
    inits = [
        tensor("W", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)),
        tensor("axes", np.array([2])),
        *bn_initializers(p),
    ]
    m = model(nodes, [("x", [1, 3, 1, 5])], ["y", "sq"], inits)
    record, _ = only_record(m)
    assert record.action == "kept" and "the output of Squeeze sq has other readers" in str(record.reason)  # type: ignore[attr-defined]
