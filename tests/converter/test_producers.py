"""Each producer kind: the closed-form W′ and b′, and ONNX Runtime outputs before vs after, vs the oracle."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import ModelProto, helper, numpy_helper

from converter import convert
from converter import reference as ref
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor


def fold(m: ModelProto) -> ModelProto:
    result = convert(m)  # verification on: it must pass at the default tolerance
    assert result.report.verification is not None and result.report.verification.passed
    assert all(r.action == "folded" for r in result.report.layers), result.report.to_text()
    return result.model


def prove(m: ModelProto, folded: ModelProto, producer_only: ModelProto, p: ref.BatchNormParams, x: np.ndarray) -> None:
    """ORT before vs after, and after vs the oracle's test step on the producer's own output."""
    before = run(m, {"x": x})[0]
    after = run(folded, {"x": x})[0]
    oracle = ref.test_step(run(producer_only, {"x": x})[0].astype(np.float64), p)
    assert close(after, before), np.max(np.abs(after - before))
    assert close(after, oracle), np.max(np.abs(after - oracle))


CONV_CASES = [
    # dims, cin, cout, group, kernel, stride, dilation, pad, bias
    pytest.param(1, 3, 4, 1, 3, 1, 1, 1, True, id="conv1d"),
    pytest.param(2, 3, 8, 1, 3, 2, 1, 1, False, id="conv2d-stride-nobias"),
    pytest.param(2, 4, 8, 2, 3, 1, 2, 2, True, id="conv2d-grouped-dilated"),
    pytest.param(2, 6, 6, 6, 3, 1, 1, 1, False, id="depthwise"),
    pytest.param(2, 4, 12, 4, 1, 1, 1, 0, True, id="depthwise-multiplier"),
    pytest.param(3, 2, 4, 1, 3, 1, 1, 1, True, id="conv3d"),
]


@pytest.mark.parametrize(("dims", "cin", "cout", "group", "k", "stride", "dilation", "pad", "bias"), CONV_CASES)
def test_conv(
    dims: int, cin: int, cout: int, group: int, k: int, stride: int, dilation: int, pad: int, bias: bool
) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(cout, cin // group, *[k] * dims)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    p = bn_params(rng, cout)
    attrs = dict(group=group, strides=[stride] * dims, dilations=[dilation] * dims, pads=[pad] * 2 * dims)
    inputs = ["x", "W", "b"] if bias else ["x", "W"]
    inits = [tensor("W", w)] + ([tensor("b", b)] if bias else [])
    conv = helper.make_node("Conv", inputs, ["c"], name="conv", **attrs)
    shape = [2, cin, *[7] * dims]
    m = model([conv, bn_node("c", "y")], [("x", shape)], ["y"], inits + bn_initializers(p))
    only = model([helper.make_node("Conv", inputs, ["y"], **attrs)], [("x", shape)], ["y"], inits)
    folded = fold(m)
    assert op_types(folded) == ["Conv"]

    s, t = ref.affine(p)
    (node,) = folded.graph.node
    got_w = {i.name: i for i in folded.graph.initializer}[node.input[1]]
    got_b = {i.name: i for i in folded.graph.initializer}[node.input[2]]

    want_w = (w.astype(np.float64) * s.reshape(-1, *[1] * (dims + 1))).astype(np.float32)
    want_b = ((b.astype(np.float64) if bias else 0.0) * s + t).astype(np.float32)  # = s(b − μ) + β
    np.testing.assert_array_equal(numpy_helper.to_array(got_w), want_w)
    np.testing.assert_array_equal(numpy_helper.to_array(got_b), want_b)
    assert np.allclose(want_b, s * ((b if bias else 0) - p.running_mean) + p.beta, rtol=1e-6, atol=1e-6)
    prove(m, folded, only, p, rng.normal(size=shape).astype(np.float32))


@pytest.mark.parametrize(("group", "cin", "cout"), [(1, 4, 6), (2, 4, 6), (4, 4, 4), (3, 6, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_scales_axis_1_within_each_group(group: int, cin: int, cout: int, bias: bool) -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(cin, cout // group, 3, 3)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    p = bn_params(rng, cout)
    attrs = dict(group=group, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    inputs = ["x", "W", "b"] if bias else ["x", "W"]
    inits = [tensor("W", w)] + ([tensor("b", b)] if bias else [])
    node = helper.make_node("ConvTranspose", inputs, ["c"], name="deconv", **attrs)
    m = model([node, bn_node("c", "y")], [("x", [1, cin, 5, 5])], ["y"], inits + bn_initializers(p))
    only = model([helper.make_node("ConvTranspose", inputs, ["y"], **attrs)], [("x", [1, cin, 5, 5])], ["y"], inits)
    folded = fold(m)
    assert op_types(folded) == ["ConvTranspose"]

    # the closed form, written as the loop over groups that the weight layout (C_in, C_out/g, k, k) means
    s, _ = ref.affine(p)
    want = w.astype(np.float64).copy()
    cin_g, cout_g = cin // group, cout // group
    for g in range(group):
        for j in range(cout_g):
            want[g * cin_g : (g + 1) * cin_g, j] *= s[g * cout_g + j]

    inits_out = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    np.testing.assert_array_equal(inits_out[folded.graph.node[0].input[1]], want.astype(np.float32))
    prove(m, folded, only, p, rng.normal(size=(1, cin, 5, 5)).astype(np.float32))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("beta", [1.0, 2.5])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5), (3, 1), ()], ids=str)
def test_gemm_folds_alpha_and_beta_into_effective_weight_and_bias(
    trans_b: int, alpha: float, beta: float, c_shape: tuple[int, ...] | None
) -> None:
    rng = np.random.default_rng(2)
    b_mat = rng.normal(size=(5, 4) if trans_b else (4, 5)).astype(np.float32)
    p = bn_params(rng, 5)
    inputs, inits = ["x", "B"], [tensor("B", b_mat)]
    if c_shape is not None:
        inputs.append("C")
        inits.append(tensor("C", rng.normal(size=c_shape).astype(np.float32)))
    attrs = dict(transB=trans_b, alpha=alpha, beta=beta)
    m = model(
        [helper.make_node("Gemm", inputs, ["g"], name="fc", **attrs), bn_node("g", "y")],
        [("x", [3, 4])],
        ["y"],
        inits + bn_initializers(p),
    )
    only = model([helper.make_node("Gemm", inputs, ["y"], **attrs)], [("x", [3, 4])], ["y"], inits)
    folded = fold(m)
    assert op_types(folded) == ["Gemm"]
    gemm = folded.graph.node[0]
    assert not [a for a in gemm.attribute if a.name in ("alpha", "beta")]  # both are 1 now

    values = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    s, t = ref.affine(p)
    scale = s.reshape(-1, 1) if trans_b else s.reshape(1, -1)
    np.testing.assert_array_equal(values[gemm.input[1]], (alpha * b_mat.astype(np.float64) * scale).astype(np.float32))
    c = np.zeros(1) if c_shape is None else numpy_helper.to_array(inits[-1]).astype(np.float64)
    np.testing.assert_array_equal(values[gemm.input[2]], (s * (beta * c) + t).astype(np.float32))
    prove(m, folded, only, p, rng.normal(size=(3, 4)).astype(np.float32))


@pytest.mark.parametrize("bias", [None, "after", "before"])
def test_matmul_with_and_without_bias_add(bias: str | None) -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(size=(6, 4)).astype(np.float32)
    bvec = rng.normal(size=4).astype(np.float32)
    p = bn_params(rng, 4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm")]
    inits = [tensor("W", w)]
    last = "mm"
    if bias:
        inits.append(tensor("bias", bvec))
        pair = ["mm", "bias"] if bias == "after" else ["bias", "mm"]
        nodes.append(helper.make_node("Add", pair, ["mm_b"], name="add"))
        last = "mm_b"
    only = model(
        [*nodes[:-1], helper.make_node(nodes[-1].op_type, nodes[-1].input, ["y"])], [("x", [2, 6])], ["y"], inits
    )
    m = model([*nodes, bn_node(last, "y")], [("x", [2, 6])], ["y"], inits + bn_initializers(p))
    folded = fold(m)
    assert op_types(folded) == ["MatMul", "Add"]

    values = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    s, t = ref.affine(p)
    mm, add = folded.graph.node
    np.testing.assert_array_equal(values[mm.input[1]], (w.astype(np.float64) * s).astype(np.float32))
    b0 = bvec.astype(np.float64) if bias else 0.0
    (bias_name,) = [n for n in add.input if n in values]
    np.testing.assert_array_equal(values[bias_name], (s * b0 + t).astype(np.float32))
    prove(m, folded, only, p, rng.normal(size=(2, 6)).astype(np.float32))


def test_conv_then_two_batchnorms_fold_both() -> None:
    rng = np.random.default_rng(4)
    p1, p2 = bn_params(rng, 3), bn_params(rng, 3)
    m = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "z", "bn1"), bn_node("z", "y", "bn2")],
        [("x", [1, 2, 4, 4])],
        ["y"],
        [
            tensor("W", rng.normal(size=(3, 2, 1, 1)).astype(np.float32)),
            *bn_initializers(p1, "bn1"),
            *bn_initializers(p2, "bn2"),
        ],
    )
    folded = fold(m)
    assert op_types(folded) == ["Conv"]
    x = rng.normal(size=(1, 2, 4, 4)).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])
