"""The V2 codec against tritonclient's own encoder and decoder (an independent implementation of the framing)."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
import tritonclient.http as tc
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.http._infer_result import InferResult

from service.errors import BadRequest
from service.rest.codec import OutputTensor, encode_response, parse_request
from service.v2.datatypes import DATATYPES
from tests.support.triton import triton_body

LIMIT = 1 << 20
RNG = np.random.default_rng(0)


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([f"s{i}-é".encode() for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    if datatype == "BOOL":
        return RNG.random(shape) < 0.5
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


# tritonclient refuses FP16 as JSON (JSON has no half type); that case is test_fp16_as_json_numbers
CASES = [(d, b) for d in sorted(DATATYPES) for b in (True, False) if (d, b) != ("FP16", False)]


@pytest.mark.parametrize(("datatype", "binary"), CASES)
def test_request_round_trip_through_tritonclient(datatype: str, binary: bool) -> None:
    value = sample(datatype, (2, 3))
    inp = tc.InferInput("x", list(value.shape), datatype)
    inp.set_data_from_numpy(value, binary_data=binary)
    body, header_length = triton_body([inp], request_id="r1")
    request = parse_request(body, header_length, LIMIT)
    (tensor,) = request.inputs
    assert request.id == "r1" and request.binary_output  # no outputs named: tritonclient asks for binary
    assert tensor.datatype == datatype and tensor.shape == (2, 3)
    if datatype == "BYTES":
        got = [v if isinstance(v, bytes) else v.encode() for v in tensor.array.ravel()]
        assert got == list(value.ravel())
    else:
        np.testing.assert_array_equal(tensor.array, value)
        assert tensor.array.dtype == DATATYPES[datatype]


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
@pytest.mark.parametrize("binary", [True, False])
def test_response_round_trip_through_tritonclient(datatype: str, binary: bool) -> None:
    value = sample(datatype, (1, 4))
    body, header_length = encode_response("m", "1", "abc", [OutputTensor("y", value, binary)])
    assert (header_length is not None) == binary
    result = InferResult.from_response_body(body, header_length=header_length)
    assert result.get_response()["id"] == "abc"
    got = result.as_numpy("y")
    if datatype == "BYTES":  # as JSON, BYTES travel as (UTF-8) strings
        assert [g if isinstance(g, bytes) else g.encode() for g in got.ravel()] == list(value.ravel())
    elif datatype == "FP16" and not binary:
        np.testing.assert_allclose(got.astype(np.float32), value.astype(np.float32), rtol=1e-3)
    else:
        np.testing.assert_array_equal(got, value)


def test_fp16_as_json_numbers() -> None:
    body = b'{"inputs":[{"name":"x","shape":[3],"datatype":"FP16","data":[0.5, -2, 65504]}]}'
    tensor = parse_request(body, None, LIMIT).inputs[0].array
    assert tensor.dtype == np.float16
    np.testing.assert_array_equal(tensor, np.array([0.5, -2, 65504], np.float16))


def test_uint64_beyond_int64_stays_exact() -> None:
    body = b'{"inputs":[{"name":"x","shape":[2],"datatype":"UINT64","data":[18446744073709551615, 1]}]}'
    np.testing.assert_array_equal(parse_request(body, None, LIMIT).inputs[0].array, [2**64 - 1, 1])


def test_mixed_binary_and_json_inputs_and_outputs_parameters() -> None:
    a, b = sample("FP32", (1, 5)), sample("INT64", (1, 2))
    ia, ib = tc.InferInput("a", [1, 5], "FP32"), tc.InferInput("b", [1, 2], "INT64")
    ia.set_data_from_numpy(a, binary_data=True)
    ib.set_data_from_numpy(b, binary_data=False)
    outs = [tc.InferRequestedOutput("y", binary_data=False, class_count=3), tc.InferRequestedOutput("z")]
    body, header_length = triton_body([ia, ib], outs, timeout=1500)
    request = parse_request(body, header_length, LIMIT)
    np.testing.assert_array_equal(request.inputs[0].array, a)
    np.testing.assert_array_equal(request.inputs[1].array, b)
    assert request.timeout_us == 1500
    assert [(o.name, o.binary, o.classification) for o in request.outputs or []] == [("y", False, 3), ("z", True, 0)]


def test_nested_json_data_matching_the_shape() -> None:
    body = b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"INT32","data":[[1,2],[3,4]]}]}'
    np.testing.assert_array_equal(parse_request(body, None, LIMIT).inputs[0].array, [[1, 2], [3, 4]])


def framed(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    import json

    h = json.dumps(header).encode()
    return h + b"".join(blobs), len(h)


def one(size: int | None, datatype: str = "FP32", shape: list[int] | None = None, **extra: object) -> dict:
    spec: dict = {"name": "x", "shape": shape or [1, 2], "datatype": datatype, **extra}
    if size is not None:
        spec["parameters"] = {"binary_data_size": size}
    return {"inputs": [spec]}


MALFORMED = {
    "header length past the body": (lambda: (b"{}", 10), "outside the body"),
    "header not JSON": (lambda: (b"{nope" + b"\0" * 8, 5), "not valid JSON"),
    "body not JSON": (lambda: (b"\xff\xfe", None), "not valid JSON"),
    "not an object": (lambda: (b"[1,2]", None), "JSON object"),
    "no inputs": (lambda: (b'{"inputs": []}', None), "non-empty list"),
    "size too small for the shape": (lambda: framed(one(4), b"\0" * 4), "needs 8"),
    "size past the end": (lambda: framed(one(8), b"\0" * 4), "runs past the end"),
    "bytes left over": (lambda: framed(one(8), b"\0" * 12), "4 bytes... "[:0] + "follow the header"),
    "negative size": (lambda: framed(one(-1)), "non-negative"),
    "size is a string": (lambda: framed(one("8"), b"\0" * 8), "non-negative"),  # type: ignore[arg-type]
    "huge declared shape": (lambda: framed(one(8, shape=[1 << 10, 1 << 12]), b"\0" * 8), "above the limit"),
    "absurd dim of an empty tensor": (lambda: framed(one(0, shape=[0, 1 << 62])), "beyond the limits"),
    "negative dim": (lambda: framed(one(8, shape=[-1, 2]), b"\0" * 8), "negative dimension"),
    "float dim": (
        lambda: framed(one(8, shape=[1.5, 2]), b"\0" * 8),
        "inputs[0].shape[0] must be an integer, got a number",
    ),  # type: ignore[list-item]
    "bool out of range": (lambda: framed(one(2, "BOOL"), b"\x00\x07"), "0 or 1"),
    "unknown datatype": (lambda: framed(one(8, "FP8")), "unknown datatype"),
    "data and binary": (lambda: framed(one(8, data=[1, 2]), b"\0" * 8), "both data and binary"),
    "neither data nor binary": (lambda: framed(one(None)), "no data"),
    "bytes length overrun": (lambda: framed(one(8, "BYTES", shape=[1]), struct.pack("<I", 100) + b"abcd"), "overruns"),
    "bytes length cut off": (lambda: framed(one(2, "BYTES", shape=[1]), b"\x01\x00"), "cut off"),
    "bytes count": (
        lambda: framed(one(10, "BYTES", shape=[3]), struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b"),
        "2 BYTES elements",
    ),
    "ragged json": (lambda: framed(one(None, data=[[1, 2], [3]])), "ragged"),
    "wrong count json": (lambda: framed(one(None, data=[1, 2, 3])), "3 elements given"),
    "strings for floats": (lambda: framed(one(None, data=["a", "b"])), "not all FP32"),
    "float for int": (lambda: framed(one(None, "INT32", data=[1.5, 2])), "must be integers"),
    "int out of range": (lambda: framed(one(None, "INT8", data=[1, 300])), "out of the INT8 range"),
    "number for bool": (lambda: framed(one(None, "BOOL", data=[1, 0])), "true/false"),
    "bool for float": (lambda: framed(one(None, data=[True, False])), "must be numbers"),
    "number for bytes": (lambda: framed(one(None, "BYTES", data=[1, 2])), "must be strings"),
    "nested shape mismatch": (lambda: framed(one(None, shape=[2, 1], data=[[1, 2]])), "nested data has shape"),
    "timeout negative": (lambda: framed({**one(None, data=[1, 2]), "parameters": {"timeout": -5}}), "timeout"),
    "id not a string": (lambda: framed({**one(None, data=[1, 2]), "id": 7}), "id must be a string"),
    "outputs not a list": (
        lambda: framed({**one(None, data=[1, 2]), "outputs": {}}),
        "outputs must be an array, got an object",
    ),
    "classification negative": (
        lambda: framed({**one(None, data=[1, 2]), "outputs": [{"name": "y", "parameters": {"classification": -1}}]}),
        "classification",
    ),
    "binary_data not bool": (
        lambda: framed({**one(None, data=[1, 2]), "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}),
        "true or false",
    ),
}


@pytest.mark.parametrize(("make", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests_are_one_line_bad_requests(make: object, message: str) -> None:
    body, header_length = make()  # type: ignore[operator]
    with pytest.raises(BadRequest) as exc:
        parse_request(body, header_length, LIMIT)
    assert message in exc.value.message
    assert "\n" not in exc.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-10, 600)))
def test_arbitrary_bytes_never_raise_anything_but_bad_request(body: bytes, header_length: int | None) -> None:
    with contextlib.suppress(BadRequest):
        parse_request(body, header_length, LIMIT)


SIZES = st.integers(-(1 << 62), 1 << 62)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(DATATYPES)), st.lists(SIZES, max_size=4), st.one_of(SIZES, st.none())),
        min_size=1,
        max_size=3,
    ),
    st.binary(max_size=64),
)
def test_forged_sizes_and_shapes_are_refused_without_large_allocations(
    specs: list[tuple[str, list[int], int | None]], tail: bytes
) -> None:
    """Huge or inconsistent declared sizes: BadRequest, decided before any allocation of the declared size."""
    import tracemalloc

    header = {
        "inputs": [
            {
                "name": f"x{i}",
                "datatype": d,
                "shape": s,
                **({"parameters": {"binary_data_size": n}} if n is not None else {}),
            }
            for i, (d, s, n) in enumerate(specs)
        ]
    }
    body, header_length = framed(header, tail)
    tracemalloc.start()
    try:
        parse_request(body, header_length, LIMIT)
    except BadRequest:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1 << 20
