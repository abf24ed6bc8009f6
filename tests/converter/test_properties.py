"""Property tests: random dims, groups, strides, dilations, bias, transB and dtypes; ORT before == after."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from converter import convert
from converter import reference as ref
from tests.converter.graphs import bn_initializers, bn_node, bn_params, close, model, op_types, run, tensor

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {
    "float32": (np.float32, TensorProto.FLOAT, 1e-5, 1e-6),
    "float64": (np.float64, TensorProto.DOUBLE, 1e-12, 1e-14),
    "float16": (np.float16, TensorProto.FLOAT16, 2e-2, 1e-3),
}


@st.composite
def conv_cases(draw: st.DrawFn) -> dict[str, object]:
    dims = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    case = {
        "dims": dims,
        "group": group,
        "cin": group * draw(st.integers(1, 3)),
        "cout": group * draw(st.integers(1, 3)),
        "k": draw(st.integers(1, 3)),
        "stride": draw(st.integers(1, 2)),
        "dilation": draw(st.integers(1, 2)),
        "pad": draw(st.integers(0, 2)),
        "bias": draw(st.booleans()),
        "transpose": draw(st.booleans()),
        "dtype": draw(st.sampled_from(["float32", "float16"])),  # ORT has no float64 Conv on CPU
        "seed": draw(st.integers(0, 2**16)),
    }
    if case["transpose"]:
        case["dilation"] = 1  # keep ConvTranspose shapes simple
        case["pad"] = min(case["pad"], case["k"] - 1)
    return case


@SETTINGS
@given(conv_cases())
def test_conv_and_conv_transpose_fold_exactly(case: dict) -> None:
    dtype, elem, rtol, atol = DTYPES[case["dtype"]]
    rng = np.random.default_rng(case["seed"])
    dims, g, cin, cout, k = case["dims"], case["group"], case["cin"], case["cout"], case["k"]
    op = "ConvTranspose" if case["transpose"] else "Conv"
    wshape = (cin, cout // g, *[k] * dims) if case["transpose"] else (cout, cin // g, *[k] * dims)
    inits = [tensor("W", rng.normal(size=wshape).astype(dtype))]
    inputs = ["x", "W"]
    if case["bias"]:
        inits.append(tensor("b", rng.normal(size=cout).astype(dtype)))
        inputs.append("b")
    attrs = dict(
        group=g,
        strides=[case["stride"]] * dims,
        dilations=[case["dilation"]] * dims,
        pads=[case["pad"]] * 2 * dims,
        kernel_shape=[k] * dims,
    )
    p = bn_params(rng, cout)
    xshape = [2, cin, *[k * 2 + 3] * dims]
    m = model(
        [helper.make_node(op, inputs, ["c"], **attrs), bn_node("c", "y")],
        [("x", xshape)],
        ["y"],
        inits + bn_initializers(p, dtype=dtype),
        elem=elem,
    )
    result = convert(m, verify=False)
    assert op_types(result.model) == [op]
    x = rng.normal(size=xshape).astype(dtype)
    before, after = run(m, {"x": x})[0], run(result.model, {"x": x})[0]
    assert after.dtype == dtype
    assert close(after, before, rtol=rtol, atol=atol), float(np.max(np.abs(after.astype(float) - before)))
    if dtype is not np.float16:  # the oracle on the producer's own output, in float64
        only = model([helper.make_node(op, inputs, ["y"], **attrs)], [("x", xshape)], ["y"], inits, elem=elem)
        oracle = ref.test_step(run(only, {"x": x})[0].astype(np.float64), p)
        assert close(after, oracle, rtol=rtol, atol=atol)


@SETTINGS
@given(
    m_rows=st.integers(1, 4),
    k=st.integers(1, 5),
    n=st.integers(1, 6),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.25, 3.0]),
    c_kind=st.sampled_from(["none", "vector", "row", "full", "column", "scalar"]),
    dtype=st.sampled_from(["float32", "float64"]),
    seed=st.integers(0, 2**16),
)
def test_gemm_folds_exactly(
    m_rows: int,
    k: int,
    n: int,
    trans_a: bool,
    trans_b: bool,
    alpha: float,
    beta: float,
    c_kind: str,
    dtype: str,
    seed: int,
) -> None:
    np_dtype, elem, rtol, atol = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    b_shape = (n, k) if trans_b else (k, n)
    inits = [tensor("B", rng.normal(size=b_shape).astype(np_dtype))]
    inputs = ["x", "B"]
    c_shapes = {"vector": (n,), "row": (1, n), "full": (m_rows, n), "column": (m_rows, 1), "scalar": ()}
    if c_kind != "none":
        inits.append(tensor("C", rng.normal(size=c_shapes[c_kind]).astype(np_dtype)))
        inputs.append("C")
    p = bn_params(rng, n)
    attrs = dict(transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta)
    xshape = [k, m_rows] if trans_a else [m_rows, k]
    m = model(
        [helper.make_node("Gemm", inputs, ["g"], **attrs), bn_node("g", "y")],
        [("x", xshape)],
        ["y"],
        inits + bn_initializers(p, dtype=np_dtype),
        elem=elem,
    )
    result = convert(m, verify=False)
    assert op_types(result.model) == ["Gemm"]
    x = rng.normal(size=xshape).astype(np_dtype)
    before, after = run(m, {"x": x})[0], run(result.model, {"x": x})[0]
    assert close(after, before, rtol=rtol, atol=atol)
