"""The simdjson path for large JSON bodies gives exactly what the orjson path gives, or steps aside."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import BadRequest
from service.rest import fastjson
from service.rest.codec import InferRequest, parse_request

LIMIT = 1 << 20


@pytest.fixture(autouse=True)
def restore_threshold() -> Iterator[None]:
    saved = fastjson.MIN_BYTES
    yield
    fastjson.MIN_BYTES = saved


def parsed(body: bytes, fast: bool) -> tuple[str, Any]:
    """The request as comparable plain data, or the 400's message."""
    fastjson.MIN_BYTES = 0 if fast else 1 << 62
    try:
        request: InferRequest = parse_request(body, None, LIMIT)
    except BadRequest as exc:
        return "error", exc.message
    inputs = [(t.name, t.datatype, t.shape, t.array.dtype.str, t.array.tobytes()) for t in request.inputs]
    return "ok", (inputs, request.outputs, request.id, request.parameters, request.timeout_us)


def same_both_ways(body: bytes) -> tuple[str, Any]:
    slow, fast = parsed(body, fast=False), parsed(body, fast=True)
    assert fast == slow
    return fast


def request(data: Any, datatype: str = "FP32", shape: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    n = len(data) if isinstance(data, list) else 1
    spec = {"name": "x", "shape": shape if shape is not None else [n], "datatype": datatype, "data": data}
    return {"id": "r1", "inputs": [spec], **extra}


def taken(body: bytes) -> bool:
    fastjson.MIN_BYTES = 0
    return fastjson.loads(body) is not None


def test_a_224_image_takes_the_fast_path_at_the_default_threshold() -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    body = orjson.dumps(request(x.ravel().tolist(), shape=[1, 3, 224, 224], outputs=[{"name": "y"}]))
    obj = fastjson.loads(body)
    assert obj is not None and isinstance(obj["inputs"][0]["data"], np.ndarray)
    kind, value = same_both_ways(body)
    assert kind == "ok"
    assert np.array_equal(np.frombuffer(value[0][0][4], np.float32).reshape(x.shape), x)


FINITE = st.floats(allow_nan=False, allow_infinity=False, width=64)
NUMBERS = st.one_of(FINITE, st.integers(-(1 << 70), 1 << 70), st.floats(-1e6, 1e6, width=32))
ELEMENTS = st.one_of(NUMBERS, NUMBERS, st.booleans(), st.none(), st.text(max_size=3), st.lists(NUMBERS, max_size=2))


@settings(max_examples=400, deadline=None)
@given(
    st.lists(ELEMENTS, max_size=12),
    st.sampled_from(["FP16", "FP32", "FP64", "INT64", "BOOL"]),
    st.one_of(st.none(), st.lists(st.integers(0, 13), max_size=3)),
    st.booleans(),
)
def test_any_data_parses_the_same_both_ways(
    data: list[Any], datatype: str, shape: list[int] | None, spaced: bool
) -> None:
    obj = request(data, datatype, shape)
    body = json.dumps(obj, indent=1 if spaced else None, separators=None if spaced else (",", ":")).encode()
    same_both_ways(body)


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (request([[1.0], 2.0, 3.0]), "a nested array of one"),
        (request([[], [1.0, 2.0]], shape=[2]), "an empty nested array"),
        (request([True, 1.5]), "a boolean"),
        (request([1.5, None]), "a null"),
        (request([1.5, float(2**53)]), "a value at 2**53"),
        (request([1.5, 2**63 + 1]), "an integer beyond int64"),
        (request([1.5, 2**64]), "an integer beyond 64 bits"),
    ],
)
def test_what_the_fast_path_cannot_match_exactly_goes_to_orjson(obj: dict[str, Any], why: str) -> None:
    body = json.dumps(obj).encode()
    assert not taken(body), why
    same_both_ways(body)


def test_repeated_keys_and_unicode_escapes_go_to_orjson() -> None:
    repeated = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2], "data": [3, 4]}]}'
    assert not taken(repeated)
    assert same_both_ways(repeated)[0] == "ok"
    escaped = b'{"id": "\\u005b", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[1]]}]}'
    assert not taken(escaped)
    assert same_both_ways(escaped)[0] == "error"


def test_brackets_in_strings_do_not_hide_a_nested_array() -> None:
    flat = request([1.0, 2.0], parameters={"tag": "[x]"})
    assert taken(orjson.dumps(flat))
    nested = request([[1.0], 2.0], shape=[2], parameters={"tag": "x"})
    assert not taken(orjson.dumps(nested))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[1, 2]",
        b'{"inputs": 1}',
        b'{"a": NaN}',
        b"\xff\xfe",
        b'{"a": 1e400}',
        b'\xef\xbb\xbf{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
    ],
)
def test_malformed_bodies_get_the_same_400(body: bytes) -> None:
    assert same_both_ways(body)[0] == "error"


TOKENS = [
    *(b"{", b"}", b"[", b"]", b",", b":", b" ", b"\n", b"\xef\xbb\xbf", b"\x00", b'"\xc3\xa9"', b'"x\\u0041"'),
    *(b'"inputs"', b'"name"', b'"x"', b'"shape"', b'"datatype"', b'"FP32"', b'"data"', b'"id"', b'"[x"'),
    *(b"1", b"-0", b"1.5e3", b"1e999", b"true", b"null", b"18446744073709551616", b"-9223372036854775809"),
]
SKELETON = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.5, %s]}]}'


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=12), st.booleans())
def test_token_soup_parses_the_same_both_ways(tokens: list[bytes], inside: bool) -> None:
    soup = b"".join(tokens)
    same_both_ways(SKELETON % soup if inside else soup)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b" ", b"\n", b"\t", b"\r", b"\x0b", b"\x00", b"\xef\xbb\xbf"]), max_size=3))
def test_whatever_precedes_a_valid_request_is_judged_the_same_both_ways(prefix: list[bytes]) -> None:
    same_both_ways(b"".join(prefix) + SKELETON % b"2")


def test_a_real_server_answers_a_large_json_request_like_onnx_runtime(tmp_path: Path) -> None:
    """End to end: tritonclient's JSON tensors (no binary) above the threshold, through uvicorn, into ONNX Runtime."""
    import tritonclient.http as tc
    from onnx import TensorProto, helper, numpy_helper

    from tests.support.servers import in_process, save
    from tests.support.triton import triton_body

    n = 20_000  # ~400 KB of JSON: over MIN_BYTES, and over the size decoded off the event loop
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(np.array(3.0, np.float32), "k")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "repo", "wide")
    with in_process(model_repository=tmp_path / "repo") as server:
        x = np.random.default_rng(3).standard_normal((1, n)).astype(np.float32)
        inp = tc.InferInput("x", [1, n], "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        out = tc.InferRequestedOutput("y", binary_data=False)
        body, _ = triton_body([inp], [out])
        assert fastjson.loads(body) is not None  # the body tritonclient sends takes the simdjson path
        got = tc.InferenceServerClient(url=server.address).infer("wide", [inp], outputs=[out]).as_numpy("y")
        assert got is not None and np.array_equal(got, x * np.float32(3.0))
        nested = {"inputs": [{"name": "x", "shape": [1, n], "datatype": "FP32", "data": [[0.5], *[0.5] * (n - 1)]}]}
        with server.client() as http:
            reply = http.post("/v2/models/wide/infer", content=orjson.dumps(nested))
        assert reply.status_code == 400 and "ragged" in reply.json()["error"]


@given(st.one_of(st.binary(max_size=300), st.text("[]1, ", max_size=300).map(str.encode)), st.integers(1, 64))
def test_the_sliced_count_counts_like_bytes_count(body: bytes, step: int) -> None:
    assert fastjson._count(body, b"[", step) == body.count(b"[")
