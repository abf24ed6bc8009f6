"""Every error status and message: a client's mistake is a 4xx with {"error": "<one line>"}, never a 500."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from tests.support.reliability import metric, read_reply, wait_until
from tests.support.servers import InThread, hold_inference, in_process

PIXELS = {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}


def body(*inputs: dict, **extra: object) -> dict:
    return {"inputs": list(inputs), **extra}


STATIC = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}


def with_(**changes: object) -> dict:
    return {**PIXELS, **changes}


CASES = {
    "unknown model": ("/v2/models/nope/infer", body(PIXELS), 404, "unknown model 'nope'"),
    "unknown version": ("/v2/models/digits/versions/9/infer", body(PIXELS), 404, "unknown version '9'"),
    "non-numeric version": ("/v2/models/digits/versions/x/infer", body(PIXELS), 404, "unknown version 'x'"),
    "model not ready": ("/v2/models/corrupt/infer", body(PIXELS), 503, "not an ONNX model"),
    "wrong input name": ("/v2/models/digits/infer", body(with_(name="x")), 400, "has no input 'x' (inputs: pixels)"),
    "missing input": (
        "/v2/models/dtypes/infer",
        body({**PIXELS, "name": "in_FP32", "shape": [1, 3], "data": [1, 2, 3]}),
        400,
        "missing input(s)",
    ),
    "twice": ("/v2/models/digits/infer", body(PIXELS, PIXELS), 400, "given twice"),
    "wrong datatype": (
        "/v2/models/digits/infer",
        body(with_(datatype="FP64")),
        400,
        "datatype FP64, the model takes FP32",
    ),
    "wrong rank": ("/v2/models/digits/infer", body(with_(shape=[1, 64])), 400, "the model takes [-1, 1, 8, 8]"),
    "wrong dim": ("/v2/models/digits/infer", body(with_(shape=[1, 1, 4, 16])), 400, "the model takes"),
    "batch above max": (
        "/v2/models/digits/infer",
        body(with_(shape=[2, 1, 8, 8], data=[0.0] * 128)),
        400,
        "max batch size is 1",
    ),
    "batch zero": ("/v2/models/digits/infer", body(with_(shape=[0, 1, 8, 8], data=[])), 400, "batch size 0"),
    "element count": ("/v2/models/digits/infer", body(with_(data=[0.0] * 63)), 400, "63 elements given"),
    "ragged": ("/v2/models/digits/infer", body(with_(data=[[0.0] * 8] * 7 + [[0.0] * 7])), 400, "ragged"),
    "strings for numbers": ("/v2/models/digits/infer", body(with_(data=["a"] * 64)), 400, "not all FP32"),
    "unknown output": (
        "/v2/models/digits/infer",
        body(PIXELS, outputs=[{"name": "probs"}]),
        400,
        "has no output 'probs' (outputs: logits)",
    ),
    "classification of a non-number": ("/v2/models/dtypes/infer", None, 400, "classification needs numbers"),
    "no inputs": ("/v2/models/digits/infer", {"inputs": []}, 400, "non-empty list"),
    "huge shape": ("/v2/models/digits/infer", body(with_(shape=[1, 1, 1 << 30, 1 << 30])), 400, "limit"),
}


def _dtypes_classification() -> dict:
    inputs = []
    for name in (
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    ):
        data: object = ["", "", ""] if name == "BYTES" else [False] * 3 if name == "BOOL" else [0, 0, 0]
        inputs.append({"name": f"in_{name}", "shape": [1, 3], "datatype": name, "data": data})
    return {"inputs": inputs, "outputs": [{"name": "out_BYTES", "parameters": {"classification": 1}}]}


@pytest.mark.parametrize(("path", "payload", "status", "message"), CASES.values(), ids=CASES.keys())
def test_error_status_and_message(server: InThread, path: str, payload: dict | None, status: int, message: str) -> None:
    with server.client() as http:
        r = http.post(path, json=payload if payload is not None else _dtypes_classification())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error
    assert "\n" not in error


def test_malformed_transport_details(server: InThread) -> None:
    with server.client() as http:
        r = http.post("/v2/models/digits/infer", content=b"{not json")
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        good = json.dumps(body(PIXELS)).encode()
        r = http.post("/v2/models/digits/infer", content=good, headers={"Inference-Header-Content-Length": "abc"})
        assert r.status_code == 400 and "non-negative integer" in r.json()["error"]
        r = http.post("/v2/models/digits/infer", content=good, headers={"Inference-Header-Content-Length": "99999"})
        assert r.status_code == 400 and "outside the body" in r.json()["error"]
        binary = json.dumps(body(with_(data=None, parameters={"binary_data_size": 256}))).encode()
        r = http.post(
            "/v2/models/digits/infer",
            content=binary + b"\0" * 255,
            headers={"Inference-Header-Content-Length": str(len(binary))},
        )
        assert r.status_code == 400, r.text
        r = http.post("/v2/models/digits/infer", content=b"\0" * 100, headers={"Inference-Header-Content-Length": "0"})
        assert r.status_code == 400 and "needs 256" in r.json()["error"]
        r = http.post("/v2/models/digits/infer", content=b"not gzip", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "not valid gzip" in r.json()["error"]
        r = http.post("/v2/models/digits/infer", content=gzip.compress(good)[:-6], headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400
        r = http.post("/v2/models/digits/infer", content=good, headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and "not supported" in r.json()["error"]
        r = http.get("/v2/models/digits/infer")
        assert r.status_code == 405 and r.json()["error"]
        r = http.get("/v2/nothing/here")
        assert r.status_code == 404 and r.json()["error"] == "Not Found"
        r = http.get("/v2/models/corrupt/ready")
        assert r.status_code == 503 and r.json()["ready"] is False
        r = http.get("/v2/models/nope")
        assert r.status_code == 404
        r = http.get("/v2/models/..%2F..%2Fetc/config")
        assert r.status_code == 404


@pytest.fixture(scope="module")
def limited(repo: Path) -> Iterator[InThread]:
    """Small limits: 2 KiB bodies, one compute slot, one queued request; and an API key."""
    with in_process(
        model_repository=repo,
        max_body_bytes=2048,
        max_concurrency=1,
        max_queue=1,
        api_key="s3cret",
        retry_after_seconds=2,
        body_timeout_seconds=1,
    ) as srv:
        yield srv


KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def test_body_limit_is_413_also_when_inflated(limited: InThread) -> None:
    big = json.dumps(body(with_(data=[1.2345678] * 64))).encode() + b" " * 2048
    with limited.client(headers=AUTH) as http:
        r = http.post("/v2/models/digits/infer", content=big)
        assert r.status_code == 413 and "limit of 2048" in r.json()["error"]
        r = http.post("/v2/models/digits/infer", content=gzip.compress(big), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and "inflated" in r.json()["error"]

        def chunks() -> Iterator[bytes]:
            yield big[:1000]
            yield big[1000:]

        r = http.post("/v2/models/digits/infer", content=chunks())  # no Content-Length: counted while read
        assert r.status_code == 413


def test_api_key_guards_models_and_metrics_not_health(limited: InThread) -> None:
    with limited.client() as http:
        for path in ("/v2/health/live", "/v2/health/ready", "/v2"):
            assert http.get(path).status_code == 200, path
        assert http.get("/metrics").status_code == 401  # model names, versions and traffic
        assert http.get("/metrics", headers=AUTH).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = http.get("/v2/models/digits", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "API key" in r.json()["error"]
            assert http.post("/v2/models/digits/infer", json=body(PIXELS), headers=headers).status_code == 401
        assert http.get("/v2/models/nope", headers=AUTH).status_code == 404  # no model probing without the key
        assert http.get("/v2/models/nope").status_code == 401
        assert http.post("/v2/models/digits/infer", json=body(PIXELS), headers=AUTH).status_code == 200
    client = tc.InferenceServerClient(url=limited.address)
    with pytest.raises(InferenceServerException):
        client.get_model_metadata("digits")
    assert client.get_model_metadata("digits", headers=AUTH)["name"] == "digits"


def test_full_queue_answers_503_with_retry_after_then_recovers(limited: InThread) -> None:
    """One request computing (held inside ONNX Runtime), one queued: the next is refused at once, 503 with
    Retry-After; once the held one is let go, both finish 200 and the server serves again."""
    statuses: list[int] = []

    def worker() -> None:
        with limited.client(headers=AUTH) as http:
            statuses.append(http.post("/v2/models/static/infer", json=STATIC).status_code)

    wait_until(lambda: metric(limited, "bnfold_requests_in_flight", KEY) == 0, 30, what="no inference in flight")
    with hold_inference() as held:
        computing = threading.Thread(target=worker)
        computing.start()
        held.wait_entered()
        queued = threading.Thread(target=worker)
        queued.start()
        wait_until(lambda: metric(limited, "bnfold_requests_in_flight", KEY) == 2, 30, what="one computing, one queued")
        with limited.client(headers=AUTH, timeout=20) as http:
            refused = http.post("/v2/models/static/infer", json=STATIC)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2", refused.text
        assert "server busy" in refused.json()["error"]
        held.release()
        computing.join(60)
        queued.join(60)
    assert statuses == [200, 200]
    with limited.client(headers=AUTH) as http:
        assert http.post("/v2/models/static/infer", json=STATIC).status_code == 200


def test_timeout_parameter_gives_504(limited: InThread) -> None:
    slow = {
        "inputs": [{"name": "x", "shape": [1, 384], "datatype": "FP32", "data": [0.5] * 384}],
        "parameters": {"timeout": 1000},
    }
    with limited.client(headers=AUTH) as http:
        r = http.post("/v2/models/slow/infer", json=slow)
        assert r.status_code == 504 and "timeout" in r.json()["error"]
        slow["parameters"] = {"timeout": 60_000_000}
        assert http.post("/v2/models/slow/infer", json=slow).status_code == 200


def test_no_client_mistake_is_a_500(server: InThread) -> None:
    rng = np.random.default_rng(1)
    junk = [
        b"",
        b"null",
        b"[]",
        b"{}",
        b'{"inputs": null}',
        b'{"inputs": [null]}',
        b'{"inputs": [{}]}',
        b'{"inputs": [{"name": 1}]}',
        b'{"inputs": [{"name": "pixels", "shape": "x", "datatype": "FP32"}]}',
        b'{"inputs": [{"name": "pixels", "shape": [1,1,8,8], "datatype": "FP32", "data": {"a": 1}}]}',
        b'{"parameters": [], "inputs": []}',
        bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
    ]
    with server.client() as http:
        for content in junk:
            for headers in ({}, {"Inference-Header-Content-Length": "0"}, {"Inference-Header-Content-Length": "3"}):
                r = http.post("/v2/models/digits/infer", content=content, headers=headers)
                assert 400 <= r.status_code < 500, (content, headers, r.status_code, r.text)
                assert isinstance(r.json()["error"], str)


def test_http_client_sees_connection_survive_errors(server: InThread) -> None:
    with httpx.Client(base_url=server.url) as http:
        for _ in range(3):
            assert http.post("/v2/models/nope/infer", json={}).status_code == 404
        assert http.get("/v2/health/ready").status_code == 200


def test_a_body_that_never_arrives_is_408_and_frees_its_place(limited: InThread) -> None:
    import socket

    # an earlier test's slow request may still hold the single slot
    wait_until(lambda: metric(limited, "bnfold_requests_in_flight", KEY) == 0, 30, what="no inference in flight")

    with socket.create_connection(("127.0.0.1", limited.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs"'
        )
        reply = read_reply(sock)  # head and body may arrive in separate segments
    assert reply.status == 408 and "not received within 1 s" in reply.body.decode()
    with limited.client(headers=AUTH) as http:
        assert http.post("/v2/models/digits/infer", json=body(PIXELS)).status_code == 200
