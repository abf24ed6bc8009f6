"""Forward folding (a BatchNorm whose only reader is a linear layer): closed-form W′ and b′, ONNX Runtime before vs
after, and hypothesis properties over Gemm transA/transB, MatMul ranks, Conv groups/strides/dilations/kernels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import ModelProto, TensorProto, helper, numpy_helper

from converter import convert
from converter import reference as ref
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def values(m: ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def layer(m: ModelProto, op: str) -> object:
    (node,) = [n for n in m.graph.node if n.op_type == op]
    return node


def folded_or_kept(m: ModelProto) -> tuple[str, str | None, ModelProto]:
    result = convert(m)  # verification on, at the float32 default tolerance
    (record,) = result.report.layers
    return record.action, record.reason, result.model


def relu_bn(cin: int, shape: list[int], p: ref.BatchNormParams) -> list[object]:
    """x → Relu → BN: the BN cannot fold backward, so only a forward fold can remove it."""
    return [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "z")]


def test_conv_forward_closed_form_per_group() -> None:
    rng = np.random.default_rng(30)
    group, cin, cout, k = 2, 4, 6, 3
    w = rng.normal(size=(cout, cin // group, k, k)).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32)
    p = bn_params(rng, cin)
    conv = helper.make_node("Conv", ["z", "W", "b"], ["y"], name="conv", group=group, strides=[2, 1])
    m = model(
        [*relu_bn(cin, [], p), conv],
        [("x", [2, cin, 7, 7])],
        ["y"],
        [tensor("W", w), tensor("b", b), *bn_initializers(p)],
    )
    action, _, folded = folded_or_kept(m)
    assert action == "folded" and op_types(folded) == ["Relu", "Conv"]
    s, t = ref.affine(p)
    node = layer(folded, "Conv")
    got = values(folded)
    w64, want_w, want_b = w.astype(np.float64), np.empty_like(w), b.astype(np.float64).copy()
    for o in range(cout):  # loops, independent of the vectorised fold
        for j in range(cin // group):
            i = (o // (cout // group)) * (cin // group) + j
            want_w[o, j] = (w64[o, j] * s[i]).astype(np.float32)
            want_b[o] += float(np.sum(w64[o, j])) * t[i]
    np.testing.assert_array_equal(got[node.input[1]], want_w)  # type: ignore[attr-defined]
    np.testing.assert_allclose(got[node.input[2]], want_b, rtol=1e-7, atol=1e-7)  # type: ignore[attr-defined]
    x = rng.normal(size=(2, cin, 7, 7)).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (3, 5)], ids=str)
def test_gemm_forward_closed_form(trans_b: int, c_shape: tuple[int, ...] | None) -> None:
    rng = np.random.default_rng(31)
    bmat = rng.normal(size=(5, 4) if trans_b else (4, 5)).astype(np.float32)
    p = bn_params(rng, 4)
    inputs, inits = ["z", "B"], [tensor("B", bmat)]
    if c_shape:
        inputs.append("C")
        inits.append(tensor("C", rng.normal(size=c_shape).astype(np.float32)))
    gemm = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)
    m = model([*relu_bn(4, [], p), gemm], [("x", [3, 4])], ["y"], inits + bn_initializers(p))
    action, _, folded = folded_or_kept(m)
    assert action == "folded" and op_types(folded) == ["Relu", "Gemm"]
    s, t = ref.affine(p)
    node = layer(folded, "Gemm")
    assert not [a for a in node.attribute if a.name in ("alpha", "beta")]  # type: ignore[attr-defined]
    got = values(folded)
    b64 = bmat.astype(np.float64)
    eff = b64.T if trans_b else b64  # (K, N)
    want_b = 0.5 * (b64 * s[None, :] if trans_b else b64 * s[:, None])
    c = numpy_helper.to_array(inits[1]).astype(np.float64) if c_shape else 0.0
    np.testing.assert_array_equal(got[node.input[1]], want_b.astype(np.float32))  # type: ignore[attr-defined]
    np.testing.assert_allclose(got[node.input[2]], 2.0 * c + 0.5 * (t @ eff), rtol=1e-7, atol=1e-7)  # type: ignore[attr-defined]
    x = rng.normal(size=(3, 4)).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])


@pytest.mark.parametrize("bias", [False, True])
def test_matmul_forward_closed_form_merges_into_a_following_bias(bias: bool) -> None:
    rng = np.random.default_rng(32)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    bvec = rng.normal(size=3).astype(np.float32)
    p = bn_params(rng, 6)
    nodes = [*relu_bn(6, [], p), helper.make_node("MatMul", ["z", "W"], ["mm"], name="mm")]
    inits = [tensor("W", w), *bn_initializers(p)]
    if bias:
        nodes.append(helper.make_node("Add", ["mm", "bias"], ["y"], name="add"))
        inits.append(tensor("bias", bvec))
    m = model(nodes, [("x", [2, 6])], ["y" if bias else "mm"], inits)
    action, _, folded = folded_or_kept(m)
    assert action == "folded" and op_types(folded) == ["Relu", "MatMul", "Add"]
    s, t = ref.affine(p)
    got = values(folded)
    mm, add = layer(folded, "MatMul"), layer(folded, "Add")
    np.testing.assert_array_equal(got[mm.input[1]], (w.astype(np.float64) * s[:, None]).astype(np.float32))  # type: ignore[attr-defined]
    (bias_name,) = [n for n in add.input if n in got]  # type: ignore[attr-defined]
    want = t @ w.astype(np.float64) + (bvec.astype(np.float64) if bias else 0.0)
    np.testing.assert_allclose(got[bias_name], want, rtol=1e-7, atol=1e-7)
    x = rng.normal(size=(2, 6)).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])


def test_float64_forward_fold_is_exact_to_float64_precision() -> None:
    rng = np.random.default_rng(33)
    w = rng.normal(size=(6, 3))
    p = bn_params(rng, 6)
    nodes = [*relu_bn(6, [], p), helper.make_node("MatMul", ["z", "W"], ["y"], name="mm")]
    inits = [tensor("W", w), *bn_initializers(p, dtype=np.float64)]
    m = model(nodes, [("x", [2, 6])], ["y"], inits, elem=TensorProto.DOUBLE)
    action, _, folded = folded_or_kept(m)
    assert action == "folded"
    x = rng.normal(size=(2, 6))
    before, after = run(m, {"x": x})[0], run(folded, {"x": x})[0]
    assert after.dtype == np.float64
    assert np.max(np.abs(after - before)) <= 1e-13 * np.max(np.abs(before))


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"pads": [1, 1, 1, 1]}, "pads with zeros (pads [1, 1, 1, 1])"),
        ({"pads": [0, 1, 0, 0]}, "pads with zeros (pads [0, 1, 0, 0])"),
        ({"auto_pad": "SAME_UPPER"}, "pads with zeros (auto_pad SAME_UPPER)"),
    ],
)
def test_conv_with_zero_padding_is_refused_with_the_reason(attrs: dict, reason: str) -> None:
    rng = np.random.default_rng(34)
    p = bn_params(rng, 2)
    conv = helper.make_node("Conv", ["z", "W"], ["y"], name="next", kernel_shape=[3, 3], **attrs)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    m = model([*relu_bn(2, [], p), conv], [("x", [1, 2, 5, 5])], ["y"], [tensor("W", w), *bn_initializers(p)])
    action, why, _ = folded_or_kept(m)
    assert action == "kept" and "forward into Conv next" in str(why) and reason in str(why), why


@pytest.mark.parametrize(("kernel", "stride"), [(2, 1), (1, 2), (3, 2)])
def test_conv_transpose_larger_than_1x1_is_refused(kernel: int, stride: int) -> None:
    rng = np.random.default_rng(35)
    p = bn_params(rng, 2)
    w = rng.normal(size=(2, 3, kernel, kernel)).astype(np.float32)
    node = helper.make_node("ConvTranspose", ["z", "W"], ["y"], name="up", strides=[stride, stride])
    m = model([*relu_bn(2, [], p), node], [("x", [1, 2, 4, 4])], ["y"], [tensor("W", w), *bn_initializers(p)])
    action, why, _ = folded_or_kept(m)
    assert action == "kept" and "only a 1×1 stride-1 ConvTranspose is exact" in str(why)


def test_flatten_before_gemm_repeats_the_channel_scale_over_the_spatial_size() -> None:
    rng = np.random.default_rng(36)
    p = bn_params(rng, 3)
    w = rng.normal(size=(5, 3 * 4)).astype(np.float32)
    nodes = [
        *relu_bn(3, [], p),
        helper.make_node("Flatten", ["z"], ["f"]),
        helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
    ]
    m = model(nodes, [("x", [2, 3, 2, 2])], ["y"], [tensor("W", w), *bn_initializers(p)])
    action, _, folded = folded_or_kept(m)
    assert action == "folded"
    s, _ = ref.affine(p)
    node = layer(folded, "Gemm")
    want = (w.astype(np.float64) * np.repeat(s, 4)[None, :]).astype(np.float32)
    np.testing.assert_array_equal(values(folded)[node.input[1]], want)  # type: ignore[attr-defined]
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])


def test_backward_is_preferred_when_both_exist() -> None:
    rng = np.random.default_rng(37)
    p = bn_params(rng, 3)
    w1, w2 = rng.normal(size=(3, 2, 1, 1)).astype(np.float32), rng.normal(size=(4, 3, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], name="first"),
        bn_node("c", "z"),
        helper.make_node("Conv", ["z", "W2"], ["y"], name="second"),
    ]
    m = model(nodes, [("x", [1, 2, 3, 3])], ["y"], [tensor("W1", w1), tensor("W2", w2), *bn_initializers(p)])
    (record,) = convert(m).report.layers
    assert record.into == "Conv first" and str(record.fold) == "backward"


# --------------------------------------------------------------------------------------------- properties
@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, int]:
    group = draw(st.sampled_from([1, 1, 2, 3]))
    return {
        "dims": draw(st.integers(1, 2)),
        "group": group,
        "cin": group * draw(st.integers(1, 3)),
        "cout": group * draw(st.integers(1, 3)),
        "k": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 3)),
        "dilation": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@SETTINGS
@given(conv_cases())
def test_property_forward_into_unpadded_conv(case: dict[str, int]) -> None:
    rng = np.random.default_rng(case["seed"])
    dims, g, cin, cout, k = case["dims"], case["group"], case["cin"], case["cout"], case["k"]
    p = bn_params(rng, cin)
    inits = [tensor("W", rng.normal(size=(cout, cin // g, *[k] * dims)).astype(np.float32)), *bn_initializers(p)]
    inputs = ["z", "W"]
    if case["bias"]:
        inits.append(tensor("b", rng.normal(size=cout).astype(np.float32)))
        inputs.append("b")
    attrs = dict(group=g, strides=[case["stride"]] * dims, dilations=[case["dilation"]] * dims, pads=[0] * 2 * dims)
    shape = [2, cin, *[7] * dims]
    m = model([*relu_bn(cin, shape, p), helper.make_node("Conv", inputs, ["y"], **attrs)], [("x", shape)], ["y"], inits)
    action, why, folded = folded_or_kept(m)
    assert action == "folded", why
    assert "BatchNormalization" not in op_types(folded)
    x = rng.normal(size=shape).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])


@SETTINGS
@given(
    st.integers(0, 1),
    st.integers(0, 1),
    st.sampled_from([1.0, 0.5]),
    st.sampled_from([1.0, -2.0]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_property_forward_into_gemm(
    trans_a: int, trans_b: int, alpha: float, beta: float, has_c: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    k, n, rows = 4, 3, 2 if trans_a else 5  # the BN input is (rows, 4); with transA it is A stored as (K, M)
    p = bn_params(rng, 4)
    a_k = rows if trans_a else k  # Gemm contracts over A's axis 0 when transA=1
    bmat = rng.normal(size=(n, a_k) if trans_b else (a_k, n)).astype(np.float32)
    inputs, inits = ["z", "B"], [tensor("B", bmat), *bn_initializers(p)]
    if has_c:
        inputs.append("C")
        inits.append(tensor("C", rng.normal(size=n).astype(np.float32)))
    gemm = helper.make_node("Gemm", inputs, ["y"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    m = model([*relu_bn(4, [], p), gemm], [("x", [rows, 4])], ["y"], inits)
    action, why, folded = folded_or_kept(m)
    if trans_a:
        assert action == "kept" and "transA=1" in str(why)
    else:
        assert action == "folded", why
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])


@SETTINGS
@given(st.integers(2, 4), st.booleans(), st.integers(0, 2**16))
def test_property_forward_into_matmul_by_rank(rank: int, flatten: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = 3
    shape = [2, c, 2, 2][:rank]
    features = int(np.prod(shape[1:]))
    p = bn_params(rng, c)
    nodes = [*relu_bn(c, shape, p)]
    left = "z"
    if flatten:
        nodes.append(helper.make_node("Flatten", ["z"], ["f"]))
        left = "f"
    k = features if flatten else shape[-1]
    nodes.append(helper.make_node("MatMul", [left, "W"], ["y"], name="mm"))
    w = rng.normal(size=(k, 5)).astype(np.float32)
    m = model(nodes, [("x", shape)], ["y"], [tensor("W", w), *bn_initializers(p)])
    action, why, folded = folded_or_kept(m)
    if flatten or rank == 2:
        assert action == "folded", why
    else:
        assert action == "kept" and f"2-D left operand (rank {rank})" in str(why)
    x = rng.normal(size=shape).astype(np.float32)
    assert close(run(folded, {"x": x})[0], run(m, {"x": x})[0])
