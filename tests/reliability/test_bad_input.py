"""Bad input over HTTP: the binary tensor extension's framing, by hand and fuzzed (hypothesis). No 5xx, ever;
hostile sizes are 400 without a large allocation on the server. (Schemathesis: test_schemathesis.py.)"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.reliability import Reply, call, hwm_mb, reset_hwm, rss_mb
from tests.support.servers import Server

pytestmark = pytest.mark.slow  # a subprocess server: the size tests read its memory


@pytest.fixture
def server(process_server: Server) -> Server:
    """A subprocess: the size tests read its memory."""
    return process_server


# ------------------------------------------------------------------------------- binary extension over HTTP
def post(server: Server, path: str, body: bytes, header_length: str | None) -> Reply:
    headers = {} if header_length is None else {"Inference-Header-Content-Length": header_length}
    return call(server.port, "POST", path, body, headers)


def assert_client_error(reply: Reply, *context: object) -> str:
    assert reply.status == 400, (reply.status, reply.body[:300], *context)
    error = reply.json()["error"]  # type: ignore[index]
    assert isinstance(error, str) and error and "\n" not in error
    return error


PIXELS_HEADER = {
    "inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}]
}
GOOD_HEADER = json.dumps(PIXELS_HEADER).encode()
GOOD_BODY = GOOD_HEADER + struct.pack("<64f", *([1.0] * 64))

HEADER_LENGTHS = {
    "negative": "-1",
    "plus sign": "+12",
    "hex": "0x20",
    "float": "12.0",
    "empty": "",
    "one past the body": str(len(GOOD_BODY) + 1),
    "far past the body": "18446744073709551616",
    "inside the header": str(len(GOOD_HEADER) - 3),
    "into the tensor": str(len(GOOD_HEADER) + 4),
    "4000 digits": "9" * 4000,
    "5000 digits": "1" * 5000,  # past Python's int() digit limit (4300)
    "superscript two": "\u00b2",  # a latin-1 header byte that str.isdigit() accepts and int() refuses
    "superscript one": "\u00b9",
}


def test_the_well_formed_binary_request_is_served(server: Server) -> None:
    r = post(server, "/v2/models/digits/infer", GOOD_BODY, str(len(GOOD_HEADER)))
    assert r.status == 200, r.body


@pytest.mark.parametrize("value", HEADER_LENGTHS.values(), ids=HEADER_LENGTHS.keys())
def test_header_length_out_of_range_is_400(server: Server, value: str) -> None:
    r = post(server, "/v2/models/digits/infer", GOOD_BODY, value)
    assert_client_error(r, value[:20])


SIZE_CASES: dict[str, tuple[list[dict[str, Any]], bytes]] = {
    "size short of the shape": ([{"parameters": {"binary_data_size": 255}}], b"\0" * 255),
    "size beyond the shape": ([{"parameters": {"binary_data_size": 260}}], b"\0" * 260),
    "size beyond the body": ([{"parameters": {"binary_data_size": 256}}], b"\0" * 100),
    "bytes left over": ([{"parameters": {"binary_data_size": 256}}], b"\0" * 300),
    "negative size": ([{"parameters": {"binary_data_size": -256}}], b"\0" * 256),
    "size as a string": ([{"parameters": {"binary_data_size": "256"}}], b"\0" * 256),
    "size as a float": ([{"parameters": {"binary_data_size": 256.0}}], b"\0" * 256),
    "size true": ([{"parameters": {"binary_data_size": True}}], b"\0"),
    "huge size": ([{"parameters": {"binary_data_size": 1 << 62}}], b"\0" * 256),
    "size past uint64": ([{"parameters": {"binary_data_size": (1 << 64) + 256}}], b"\0" * 256),
    "huge shape, small size": ([{"shape": [1 << 20, 1 << 20], "parameters": {"binary_data_size": 256}}], b"\0" * 256),
    "shape product overflows int64": ([{"shape": [1 << 40, 1 << 40, 1 << 40, 1]}], b"\0" * 256),
    "empty dim next to a huge one": ([{"shape": [0, 1 << 62, 1, 1]}], b""),
    "rank 1000": ([{"shape": [1] * 1000}], b"\0" * 256),
    "both data and size": ([{"data": [0.0] * 64}], b"\0" * 256),
    "two inputs share the bytes": (
        [{}, {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "parameters": {"binary_data_size": 256}}],
        b"\0" * 256,
    ),
    "BYTES length prefix past the end": (
        [{"datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}],
        struct.pack("<I", 0xFFFFFFF0) + b"abcd",
    ),
    "BYTES element count 16M declared, 4 bytes sent": (
        [{"datatype": "BYTES", "shape": [1 << 24], "parameters": {"binary_data_size": 4}}],
        struct.pack("<I", 0),
    ),
}


def _framed(overrides: list[dict[str, Any]], tail: bytes) -> tuple[bytes, int]:
    base = PIXELS_HEADER["inputs"][0]
    inputs = []
    for i, o in enumerate(overrides):
        if i == 0:
            spec = {**base, **o}
            if "parameters" not in o and "data" not in o:
                spec["parameters"] = {"binary_data_size": len(tail)}
            if "data" in o:
                spec["parameters"] = {"binary_data_size": 256}
        else:
            spec = o
        inputs.append(spec)
    header = json.dumps({"inputs": inputs}).encode()
    return header + tail, len(header)


def test_sizes_that_do_not_add_up_are_400_without_a_large_allocation(server: Server) -> None:
    pid = server.proc.pid
    post(server, "/v2/models/digits/infer", GOOD_BODY, str(len(GOOD_HEADER)))  # warm
    rss_before = rss_mb(pid)
    reset_hwm(pid)
    for name, (overrides, tail) in SIZE_CASES.items():
        for model in ("digits", "dtypes", "static"):
            body, length = _framed(overrides, tail)
            reply = post(server, f"/v2/models/{model}/infer", body, str(length))
            assert_client_error(reply, name, model)
    peak = hwm_mb(pid)
    assert peak - rss_before < 25, f"peak RSS rose {peak - rss_before:.1f} MB over {rss_before:.1f} MB"
    assert rss_mb(pid) - rss_before < 10


JUNK_INT = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([1 << 31, 1 << 32, 1 << 62, (1 << 63) - 1, 1 << 63, 1 << 64, -(1 << 63)]),
)
JUNK = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5), JUNK_INT)


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    model, first = draw(
        st.sampled_from([("digits", ("pixels", "FP32")), ("static", ("x", "FP32")), ("dtypes", ("in_BYTES", "BYTES"))])
    )
    inputs = []
    for _ in range(draw(st.integers(0, 3))):
        spec: dict[str, Any] = {
            "name": draw(st.one_of(st.just(first[0]), st.text(max_size=4), JUNK)),
            "datatype": draw(st.one_of(st.just(first[1]), st.sampled_from(["BOOL", "UINT64", "FP16", "BYTES"]), JUNK)),
            "shape": draw(st.one_of(st.lists(JUNK_INT, max_size=5), JUNK)),
        }
        size = draw(st.one_of(JUNK_INT, JUNK))
        if draw(st.booleans()):
            spec["parameters"] = {"binary_data_size": size}
        else:
            spec["parameters"] = draw(st.one_of(JUNK, st.dictionaries(st.text(max_size=4), JUNK, max_size=2)))
        inputs.append(spec)
    header = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": draw(st.booleans())}}).encode()
    tail = draw(st.binary(max_size=300))
    body = header + tail
    choice = draw(st.integers(0, 4))
    length: str | None
    if choice == 0:
        length = str(len(header))
    elif choice == 1:
        length = str(len(header) + draw(st.integers(-40, 40)))
    elif choice == 2:
        length = str(draw(JUNK_INT))
    elif choice == 3:
        length = "0"  # raw single-input body
    else:
        length = None
    return model, body, length


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(binary_requests())
def test_fuzzed_binary_framing_is_never_a_server_error(server: Server, sample: tuple[str, bytes, str | None]) -> None:
    model, body, length = sample
    reply = post(server, f"/v2/models/{model}/infer", body, length)
    assert reply.status in (200, 400), (reply.status, reply.body[:300], body[:300], length)
    if reply.status == 400:
        assert_client_error(reply)


def test_fuzzing_left_the_server_healthy_and_small(server: Server) -> None:
    pid = server.proc.pid
    assert call(server.port, "GET", "/v2/health/ready").status == 200
    assert post(server, "/v2/models/digits/infer", GOOD_BODY, str(len(GOOD_HEADER))).status == 200
    assert rss_mb(pid) < 400
