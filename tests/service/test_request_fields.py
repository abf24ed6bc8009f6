"""Every request field replaced by every JSON type, at any depth, or removed: 200 or a 4xx, never a 5xx.

Valid requests (JSON and the binary extension's JSON header; every V2 datatype; flat and nested data; bodies
big enough for the simdjson path) with exactly one field changed. Every answer must be 200 with a well-formed
body, or a 4xx whose body is ``{"error": "<one line>"}``; no log record may carry a traceback or be an error.
The one 5xx a valid request can earn is 504, when its own ``parameters.timeout`` is small enough to expire, so a
504 passes only for such a timeout. Most of it runs in-process through the ASGI app (fast: no sockets); a
smaller sample goes to a real ``bnfold serve`` whose log must hold no traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from service.errors import BadRequest
from service.rest import fastjson
from service.rest.codec import DATATYPES, parse_request
from service.server import create_app
from service.settings import Settings
from tests.support.servers import V2_TYPES, Server, _model, build_repository, save

REMOVE = "<remove>"  # a sentinel the mutation applies as "delete this key / element"
Path_ = tuple[str | int, ...]

#: one value of every JSON type, the edge cases of each included; REMOVE deletes the field instead
VALUES: list[object] = [
    None,
    True,
    False,
    0,
    1,
    7,
    -1,
    1 << 63,
    1 << 64,
    1.5,
    -2.5,
    1e300,
    "",
    "x",
    "FP32",
    [],
    [[]],
    [1, [2, [3]]],
    [{"name": "x"}],
    {},
    {"a": 1},
    {"name": "x", "datatype": "FP32", "shape": [1]},
    REMOVE,
]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


# ------------------------------------------------------------------------------------------------ valid requests
@dataclass(frozen=True)
class Base:
    """One valid request: its JSON (or binary header) and the binary tensors that follow the header, if any."""

    name: str
    model: str
    header: dict[str, Any]
    blobs: tuple[bytes, ...] = ()
    paths: tuple[Path_, ...] = field(default=(), compare=False)


def values(datatype: str, count: int) -> tuple[list[Any], bytes]:
    """``count`` values of ``datatype``: as JSON data and as binary tensor bytes (little-endian)."""
    rng = np.random.default_rng(count)
    if datatype == "BYTES":
        items = [f"s{i}-é" for i in range(count)]
        return items, b"".join(struct.pack("<I", len(s.encode())) + s.encode() for s in items)
    if datatype == "BOOL":
        flags = (rng.random(count) < 0.5).tolist()
        return flags, bytes(flags)
    dtype = DATATYPES[datatype]
    if dtype.kind == "f":
        arr = rng.standard_normal(count).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
    return arr.tolist(), arr.tobytes()


def tensor(name: str, datatype: str, shape: list[int], binary: bool, nested: bool = False) -> tuple[dict, bytes]:
    data, blob = values(datatype, int(np.prod(shape)))
    spec: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        spec["parameters"] = {"binary_data_size": len(blob)}
        return spec, blob
    spec["data"] = np.array(data, dtype=object).reshape(shape).tolist() if nested else data
    spec["parameters"] = {}
    return spec, b""


def request(model: str, name: str, tensors: list[tuple[dict, bytes]], outputs: list[dict] | None) -> Base:
    header: dict[str, Any] = {
        "id": f"req-{name}",
        "parameters": {"binary_data_output": False, "timeout": 60_000_000},
        "inputs": [spec for spec, _ in tensors],
    }
    if outputs is not None:
        header["outputs"] = outputs
    blobs = tuple(blob for _, blob in tensors if blob)
    return Base(name, model, header, blobs, tuple(walk(header)))


def floats_model() -> Any:
    """f_FP16/FP32/FP64 [batch, 3] -> g_<T>: Identity on the float types (the simdjson path's datatypes)."""
    nodes, ins, outs = [], [], []
    for t in ("FP16", "FP32", "FP64"):
        nodes.append(helper.make_node("Identity", [f"f_{t}"], [f"g_{t}"]))
        ins.append(helper.make_tensor_value_info(f"f_{t}", V2_TYPES[t], ["batch", 3]))
        outs.append(helper.make_tensor_value_info(f"g_{t}", V2_TYPES[t], ["batch", 3]))
    return _model(nodes, ins, outs)


TYPES = sorted(DATATYPES)
DTYPES_OUTPUTS = [
    {"name": "out_FP32", "parameters": {"classification": 2, "binary_data": False}},
    {"name": "out_BYTES", "parameters": {"binary_data": True}},
    {"name": "out_UINT64"},
]
DIGITS_OUTPUTS = [{"name": "logits", "parameters": {"classification": 3}}]
WIDE = 2400  # rows per float input of the `floats` model: a body over fastjson.MIN_BYTES


def bases() -> list[Base]:
    def dtypes(binary: object) -> list[tuple[dict, bytes]]:
        return [tensor(f"in_{t}", t, [1, 3], binary(i)) for i, t in enumerate(TYPES)]  # type: ignore[operator]

    wide = [tensor(f"f_{t}", t, [WIDE, 3], False) for t in ("FP16", "FP32", "FP64")]
    return [
        request("dtypes", "dtypes-json", dtypes(lambda i: False), DTYPES_OUTPUTS),
        request("dtypes", "dtypes-binary", dtypes(lambda i: True), DTYPES_OUTPUTS),
        request("dtypes", "dtypes-mixed", dtypes(lambda i: i % 2 == 0), None),
        request(
            "digits", "digits-nested", [tensor("pixels", "FP32", [1, 1, 8, 8], False, nested=True)], DIGITS_OUTPUTS
        ),
        request("digits", "digits-binary", [tensor("pixels", "FP32", [1, 1, 8, 8], True)], DIGITS_OUTPUTS),
        request("static", "static-json", [tensor("x", "FP32", [3], False)], [{"name": "y"}]),
        request("floats", "floats-wide", wide, None),
    ]


def walk(value: object, path: Path_ = ()) -> Iterator[Path_]:
    """Every field's path, at every depth; of a long list (tensor data) the first and last elements only."""
    if path:
        yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from walk(child, (*path, key))
    elif isinstance(value, list):
        indices = range(len(value)) if len(value) <= 4 else (0, len(value) - 1)
        for i in indices:
            yield from walk(value[i], (*path, i))


def mutated(value: Any, path: Path_, new: object) -> Any:
    """A copy of ``value`` with the field at ``path`` replaced by ``new`` (or removed); only the path is copied."""
    key, rest = path[0], path[1:]
    copy = dict(value) if isinstance(value, dict) else list(value)
    if rest:
        copy[key] = mutated(value[key], rest, new)  # type: ignore[index]
    elif new is REMOVE:
        del copy[key]  # type: ignore[arg-type]
    else:
        copy[key] = new  # type: ignore[index]
    return copy


def encode(base: Base, header: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    if not base.blobs:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(base.blobs), {"Inference-Header-Content-Length": str(len(text))}


BASES = {b.name: b for b in bases()}
SMALL = [b for b in BASES.values() if b.model != "floats"]


# ------------------------------------------------------------------------------------------------ the property
def short_timeout(header: object) -> bool:
    """The request carries a valid ``parameters.timeout`` short enough that a 504 is the right answer."""
    params = header.get("parameters") if isinstance(header, dict) else None
    timeout = params.get("timeout") if isinstance(params, dict) else None
    return isinstance(timeout, int) and not isinstance(timeout, bool) and 0 <= timeout < 10_000_000


def check_answer(status: int, headers: httpx.Headers, body: bytes, header: object, context: object) -> None:
    assert status == 200 or 400 <= status < 500 or (status == 504 and short_timeout(header)), (status, body, context)
    if status == 200:
        length = headers.get("inference-header-content-length")
        answer = json.loads(body if length is None else body[: int(length)])
        assert isinstance(answer.get("outputs"), list) and answer["outputs"], (answer, context)
        return
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error and "\n" not in error, (error, context)


class Records(logging.Handler):
    """Log records from bnfold that are errors or carry a traceback (none is due)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.bad: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            self.bad.append(self.format(record))


@dataclass
class InProcess:
    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    records: Records

    def post(self, base: Base, header: object) -> None:
        body, headers = encode(base, header)  # type: ignore[arg-type]
        reply = self.loop.run_until_complete(
            self.client.post(f"/v2/models/{base.model}/infer", content=body, headers=headers)
        )
        check_answer(reply.status_code, reply.headers, reply.content, header, (base.name, body[:400]))
        assert not self.records.bad, self.records.bad


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_repository(tmp_path_factory.mktemp("fields-repo"))
    save(floats_model(), root, "floats", config=json.dumps({"max_batch_size": 4096}))
    return root


@pytest.fixture(scope="module")
def app(repository: Path) -> Iterator[InProcess]:
    """The ASGI app in this process, started (models loaded) and stopped through its own lifespan."""
    asgi = create_app(
        Settings(
            model_repository=repository,
            warmup_runs=1,
            reuse_large_buffers=False,
            repository_poll_seconds=0,
            grpc_port=0,
        )
    )
    loop = asyncio.new_event_loop()
    span = asgi.app.state.server.lifespan(asgi.app)
    loop.run_until_complete(span.__aenter__())
    records = Records()
    logger = logging.getLogger("bnfold")
    logger.addHandler(records)  # after start-up: the corrupt model's load error is expected there
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://bnfold", timeout=60)
    try:
        yield InProcess(loop, client, records)
    finally:
        logger.removeHandler(records)
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(span.__aexit__(None, None, None))
        loop.close()


def test_the_valid_requests_are_served_and_one_takes_the_simdjson_path(app: InProcess) -> None:
    for base in BASES.values():
        body, headers = encode(base, base.header)
        reply = app.loop.run_until_complete(
            app.client.post(f"/v2/models/{base.model}/infer", content=body, headers=headers)
        )
        assert reply.status_code == 200, (base.name, reply.text[:300])
    wide = BASES["floats-wide"]
    body, _ = encode(wide, wide.header)
    assert fastjson.MIN_BYTES <= len(body) <= fastjson.MAX_BYTES and fastjson.loads(body) is not None
    assert {b.header["inputs"][0]["datatype"] for b in BASES.values()} >= {"BOOL", "FP32"}
    assert {spec["datatype"] for spec in BASES["dtypes-binary"].header["inputs"]} == set(DATATYPES)


@pytest.mark.parametrize("base", SMALL, ids=[b.name for b in SMALL])
def test_every_field_replaced_by_every_json_type_is_never_a_server_error(app: InProcess, base: Base) -> None:
    """Exhaustive: each field of the single-input requests, each of the values of every JSON type, or removed.
    The 13-input requests get the same treatment on their first input and the request-level fields."""
    paths = [p for p in base.paths if len(p) < 2 or p[0] != "inputs" or p[1] == 0]
    assert len(paths) > 10
    for path in paths:
        for value in VALUES:
            app.post(base, mutated(base.header, path, value))


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_any_field_at_any_depth_replaced_by_any_json_is_never_a_server_error(
    app: InProcess, data: st.DataObject
) -> None:
    base = data.draw(st.sampled_from(list(BASES.values())), label="base")
    path = data.draw(st.sampled_from(base.paths), label="path")
    value = data.draw(st.one_of(st.sampled_from(VALUES), JSON_VALUES), label="value")
    app.post(base, mutated(base.header, path, value))


# ------------------------------------------------------------------------------------------------ messages
@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("inputs", 0, "datatype"), {}, "inputs[0].datatype must be a string, got an object"),
        (("inputs", 0, "datatype"), [1], "inputs[0].datatype must be a string, got an array"),
        (("inputs", 0, "name"), 3, "inputs[0].name must be a string, got an integer"),
        (("inputs", 0, "name"), REMOVE, "inputs[0].name is missing"),
        (("inputs", 0, "shape", 1), True, "inputs[0].shape[1] must be an integer, got a boolean"),
        (("inputs", 0, "shape", 1), 1.0, "inputs[0].shape[1] must be an integer, got a number"),
        (("inputs", 0, "shape"), None, "inputs[0].shape must be an array, got null"),
        (("inputs", 0), "x", "inputs[0] must be an object, got a string"),
        (("inputs",), {}, "inputs must be an array, got an object"),
        (("inputs", 0, "parameters"), [], "inputs[0].parameters must be an object, got an array"),
        (("id",), 7, "id must be a string, got an integer"),
        (("parameters",), "x", "parameters must be an object, got a string"),
        (("parameters", "timeout"), 1.5, "parameters.timeout must be a non-negative integer, got a number"),
        (("parameters", "timeout"), -1, "parameters.timeout must be a non-negative integer, got -1"),
        (("parameters", "binary_data_output"), "yes", "parameters.binary_data_output must be true or false, got a"),
        (("outputs", 0, "name"), {}, "outputs[0].name must be a string, got an object"),
        (("outputs", 0, "parameters", "classification"), "3", "outputs[0].parameters.classification must be a non-"),
        (("outputs", 0, "parameters", "binary_data"), 1, "outputs[0].parameters.binary_data must be true or false"),
        (("outputs", 0, "parameters"), 1, "outputs[0].parameters must be an object, got an integer"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_the_type_expected(path: Path_, value: object, message: str) -> None:
    base = BASES["digits-nested"]
    body, headers = encode(base, mutated(base.header, path, value))
    length = headers.get("Inference-Header-Content-Length")
    with pytest.raises(BadRequest) as exc:
        parse_request(body, None if length is None else int(length), 1 << 20)
    assert message in exc.value.message, exc.value.message


@pytest.mark.parametrize("path", [("inputs", 0, "parameters", "binary_data_size")])
@pytest.mark.parametrize("value", ["64", 256.0, True, None, -256, {}])
def test_binary_header_fields_are_checked_the_same_way(path: Path_, value: object) -> None:
    base = BASES["digits-binary"]
    body, headers = encode(base, mutated(base.header, path, value))
    with pytest.raises(BadRequest) as exc:
        parse_request(body, int(headers["Inference-Header-Content-Length"]), 1 << 20)
    expected = "inputs[0].parameters.binary_data_size must be a non-negative integer"
    assert expected in exc.value.message or value is None, exc.value.message


def test_an_empty_outputs_list_means_every_output(app: InProcess) -> None:
    """``"outputs": []`` answers as when ``outputs`` is absent (every output, in model order), not a 500."""
    base = BASES["dtypes-json"]
    answers = []
    for header in (mutated(base.header, ("outputs",), []), mutated(base.header, ("outputs",), REMOVE)):
        body, headers = encode(base, header)
        reply = app.loop.run_until_complete(app.client.post("/v2/models/dtypes/infer", content=body, headers=headers))
        assert reply.status_code == 200, reply.text[:300]
        answers.append(reply.json()["outputs"])
    assert answers[0] == answers[1]
    assert [o["name"] for o in answers[0]] == [f"out_{t}" for t in V2_TYPES]


# ------------------------------------------------------------------------------------------------ a real server
@pytest.mark.slow
@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_a_real_server_answers_mutated_requests_without_a_traceback(
    process_server: Server, data: st.DataObject
) -> None:
    base = data.draw(st.sampled_from(SMALL), label="base")
    path = data.draw(st.sampled_from(base.paths), label="path")
    value = data.draw(st.one_of(st.sampled_from(VALUES), JSON_VALUES), label="value")
    header = mutated(base.header, path, value)
    body, headers = encode(base, header)
    server = process_server
    start = len(server.output())
    with server.client() as http:
        reply = http.post(f"/v2/models/{base.model}/infer", content=body, headers=headers)
    check_answer(reply.status_code, reply.headers, reply.content, header, (base.name, path, value))
    log = server.output()[start:]
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
