"""--bn keep / affine, the TensorFlow Mul+Add form, --fp16, and what the report says."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import ConversionError, convert, zoo
from converter import reference as ref
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor

RNG = np.random.default_rng(20)


def small_resnet() -> object:
    return zoo.resnet(blocks=(1, 1), classes=10, image=32)


def test_keep_folds_nothing_and_affine_leaves_no_batchnorm() -> None:
    m = small_resnet()
    x = RNG.normal(size=(1, 3, 32, 32)).astype(np.float32)
    keep = convert(m, bn="keep")
    assert op_types(keep.model) == op_types(m)
    assert {r.action for r in keep.report.layers} == {"kept"}
    folded = convert(m, bn="fold")
    assert "BatchNormalization" not in op_types(folded.model)
    assert close(run(folded.model, {"input": x})[0], run(m, {"input": x})[0])


def test_affine_mode_rewrites_what_cannot_fold_as_precomputed_mul_add() -> None:
    p = bn_params(RNG, 4)
    m = model(
        [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y")], [("x", [2, 4, 3, 3])], ["y"], bn_initializers(p)
    )
    result = convert(m, bn="affine")
    assert op_types(result.model) == ["Relu", "Mul", "Add"]
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    s, t = ref.affine(p)
    mul, add = result.model.graph.node[1:]
    np.testing.assert_array_equal(values[mul.input[1]], s.astype(np.float32).reshape(4, 1, 1))
    np.testing.assert_array_equal(values[add.input[1]], t.astype(np.float32).reshape(4, 1, 1))
    x = RNG.normal(size=(2, 4, 3, 3)).astype(np.float32)
    oracle = ref.test_step(np.maximum(x, 0).astype(np.float64), p)
    assert close(run(result.model, {"x": x})[0], oracle)


@pytest.mark.parametrize("producer", ["Conv", "Gemm"])
@pytest.mark.parametrize("chain", ["mul+add", "mul", "add", "add-first-operand"])
def test_tensorflow_mul_add_chain_folds(producer: str, chain: str) -> None:
    c = 4
    if producer == "Conv":
        node = helper.make_node("Conv", ["x", "W", "b"], ["p"], name="conv")
        inits = [tensor("W", RNG.normal(size=(c, 3, 1, 1)).astype(np.float32)), tensor("b", np.ones(c, np.float32))]
        xshape, cshape = [1, 3, 4, 4], (c, 1, 1)
    else:
        node = helper.make_node("Gemm", ["x", "W"], ["p"], name="fc", transB=1)
        inits = [tensor("W", RNG.normal(size=(c, 3)).astype(np.float32))]
        xshape, cshape = [2, 3], (c,)
    scale = tensor("scale", RNG.uniform(0.5, 2, cshape).astype(np.float32))
    shift = tensor("shift", RNG.normal(size=cshape).astype(np.float32))
    nodes = [node]
    if chain == "mul+add":
        nodes += [helper.make_node("Mul", ["p", "scale"], ["m"]), helper.make_node("Add", ["m", "shift"], ["y"])]
    elif chain == "mul":
        nodes += [helper.make_node("Mul", ["scale", "p"], ["y"])]
    elif chain == "add":
        nodes += [helper.make_node("Add", ["p", "shift"], ["y"])]
    else:
        nodes += [helper.make_node("Add", ["shift", "p"], ["y"])]
    m = model(nodes, [("x", xshape)], ["y"], [*inits, scale, shift])
    result = convert(m)
    assert op_types(result.model) == [producer]
    (record,) = result.report.layers
    assert record.action == "folded" and record.kind in ("Mul+Add", "Mul", "Add")
    x = RNG.normal(size=xshape).astype(np.float32)
    assert close(run(result.model, {"x": x})[0], run(m, {"x": x})[0])


def test_mul_that_is_not_per_channel_is_left_alone() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["p"])
    per_width = tensor("scale", RNG.uniform(0.5, 2, (4,)).astype(np.float32))  # broadcasts over the last axis
    m = model(
        [node, helper.make_node("Mul", ["p", "scale"], ["y"])],
        [("x", [1, 3, 4, 4])],
        ["y"],
        [tensor("W", RNG.normal(size=(4, 3, 1, 1)).astype(np.float32)), per_width],
    )
    result = convert(m)
    assert op_types(result.model) == ["Conv", "Mul"]
    assert result.report.layers == []


def test_fp16_rounds_folded_weights_once_and_keeps_float32_io() -> None:
    m = small_resnet()
    result = convert(m, fp16=True)
    graph = result.model.graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert "BatchNormalization" not in op_types(result.model)
    assert result.report.verification is not None and result.report.verification.rtol == 2e-2
    # the first conv's weight is exactly round_fp16(s·W) from float64, not a float32 value rounded again
    src = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    conv0 = next(n for n in graph.node if n.op_type == "Conv")
    bn0 = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    gamma, _, _, var = (src[n].astype(np.float64) for n in bn0.input[1:])
    s = gamma / np.sqrt(var + np.float64(np.float32(1e-5)))
    w = src[next(n for n in m.graph.node if n.op_type == "Conv").input[1]].astype(np.float64)
    assert out[conv0.input[1]].dtype == np.float16
    np.testing.assert_array_equal(out[conv0.input[1]], (w * s.reshape(-1, 1, 1, 1)).astype(np.float16))


def test_fp16_io_makes_inputs_float16() -> None:
    result = convert(small_resnet(), fp16=True, fp16_io=True)
    assert result.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


def test_fp16_overflow_fails_naming_the_layer() -> None:
    p = bn_params(RNG, 3)
    p = type(p)(p.gamma * 1e4, p.beta, p.running_mean, np.full(3, 1e-3))
    w = np.ones((3, 2, 1, 1), np.float32) * 10
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")],
        [("x", [1, 2, 2, 2])],
        ["y"],
        [tensor("W", w), *bn_initializers(p)],
    )
    assert convert(m).report.layers[0].action == "folded"  # fine in float32
    with pytest.raises(ConversionError, match=r"conv: folded value .* overflows float16"):
        convert(m, fp16=True)


def test_fp16_overflow_in_an_unfolded_tensor_names_its_reader() -> None:
    big = tensor("big", np.array([1e6], np.float32))
    m = model([helper.make_node("Mul", ["x", "big"], ["y"], name="scale_up")], [("x", [1])], ["y"], [big])
    with pytest.raises(ConversionError, match=r"big \(read by scale_up\): .* overflows float16"):
        convert(m, fp16=True)


def test_report_counts_and_json_round_trip() -> None:
    m = small_resnet()
    report = convert(m).report
    assert report.before is not None and report.after is not None
    assert report.before.batchnorms == len(report.layers) == len(report.folded)
    assert report.after.batchnorms == 0
    assert report.after.nodes == report.before.nodes - report.before.batchnorms
    data = json.loads(report.to_json())
    assert data["layers"][0]["action"] == "folded"
    assert data["verification"]["passed"] is True
    assert "folded" in report.to_text() and "verification passed" in report.to_text()


def test_inspect_an_in_memory_model_leaves_it_untouched() -> None:
    from converter import inspect_model

    m = small_resnet()
    before = m.SerializeToString()
    report = inspect_model(m)
    assert report.verification is None and report.folded
    assert "nothing was verified or written" in report.to_text()
    assert m.SerializeToString() == before
