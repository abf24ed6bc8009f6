"""The V2 gRPC API through the unmodified tritonclient.grpc: every datatype as raw and as typed contents equal to
ONNX Runtime in process and to the REST answer; every error with its status code and REST's message; metadata,
config, health, auth, limits, metrics (servers in a thread of the test process); worker processes and SIGTERM
under gRPC load (real `bnfold serve` processes, marked slow)."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.v2.datatypes import V2_TYPES
from tests.support.grpc_servers import GrpcServer, build_grpc_repository, identity_model, start_grpc
from tests.support.reliability import metric, wait_until
from tests.support.servers import free_port, hold_inference, in_process, save, slow_model

KEY = "s3cret"
BEARER = {"authorization": f"Bearer {KEY}"}
RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def grepo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_grpc_repository(tmp_path_factory.mktemp("grepo"))


@pytest.fixture(scope="module")
def served(grepo: Path) -> Iterator[GrpcServer]:
    port = free_port()
    with in_process(model_repository=grepo, grpc_port=port) as srv:
        yield GrpcServer(srv, port)


@pytest.fixture(scope="module")
def limited(grepo: Path) -> Iterator[GrpcServer]:
    """An API key, one compute slot and one queue place, 64 KiB messages."""
    port = free_port()
    limits = {"max_concurrency": 1, "max_queue": 1, "max_body_bytes": 64 << 10, "retry_after_seconds": 2}
    with in_process(model_repository=grepo, grpc_port=port, api_key=KEY, **limits) as srv:
        yield GrpcServer(srv, port)


def sample(datatype: str, batch: int = 2) -> np.ndarray:
    """[batch, 3] values of ``datatype``, extremes included."""
    dtype = V2_TYPES[datatype].dtype
    if datatype == "BYTES":
        words = [b"", b"a", "\u00e9t\u00e9".encode(), b"xyz", b"0123456789" * 3, b"k"]
        return np.array(words[: batch * 3], dtype=object).reshape(batch, 3)
    if datatype == "BOOL":
        return RNG.integers(0, 2, (batch, 3)).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = RNG.integers(info.min, info.max, batch * 3, dtype=dtype, endpoint=True)
        flat[0], flat[1] = info.min, info.max
        return flat.reshape(batch, 3)
    values = RNG.standard_normal((batch, 3)).astype(dtype)
    values[0, 0] = np.finfo(dtype).max
    return values


def ort_identity(datatype: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(identity_model(datatype).SerializeToString())  # type: ignore[attr-defined]
    feed = np.array([v.decode() for v in x.ravel()], dtype=object).reshape(x.shape) if datatype == "BYTES" else x
    (out,) = session.run(None, {"x": feed})
    if datatype == "BYTES":
        return np.array([v.encode() for v in np.asarray(out).ravel()], dtype=object).reshape(out.shape)
    return np.asarray(out)


def rest_identity(srv: GrpcServer, datatype: str, x: np.ndarray) -> np.ndarray:
    client = th.InferenceServerClient(srv.server.address)
    inp = th.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer(f"id_{datatype}", [inp]).as_numpy("y")  # type: ignore[no-any-return]


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.ravel().tolist() == want.ravel().tolist()
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------ tensors
@pytest.mark.parametrize("datatype", list(V2_TYPES))
def test_raw_contents_every_datatype_equal_ort_and_rest(served: GrpcServer, datatype: str) -> None:
    x = sample(datatype)
    client = tg.InferenceServerClient(served.target)
    inp = tg.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)  # tritonclient.grpc sends raw_input_contents
    result = client.infer(f"id_{datatype}", [inp])
    out = result.get_output("y")
    assert out.datatype == datatype and list(out.shape) == list(x.shape)
    got = result.as_numpy("y")
    assert_same(got, ort_identity(datatype, x))
    assert_same(got, rest_identity(served, datatype, x))


def typed_request(model: str, datatype: str, x: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, id="typed-1")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=list(x.shape))
    field = V2_TYPES[datatype].contents
    assert field is not None
    getattr(tensor.contents, field).extend(x.ravel().tolist())
    return request


@pytest.mark.parametrize("datatype", [d for d in V2_TYPES if V2_TYPES[d].contents is not None])
def test_typed_contents_every_datatype_equal_ort_and_rest(served: GrpcServer, datatype: str) -> None:
    x = sample(datatype)
    with grpc.insecure_channel(served.target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            typed_request(f"id_{datatype}", datatype, x)
        )
    assert response.id == "typed-1" and response.model_name == f"id_{datatype}" and response.model_version == "1"
    got = tg.InferResult(response).as_numpy("y")
    assert_same(got, ort_identity(datatype, x))
    assert_same(got, rest_identity(served, datatype, x))


def test_all_datatypes_in_one_request_and_output_selection(served: GrpcServer) -> None:
    client = tg.InferenceServerClient(served.target)
    inputs, values = [], {}
    for datatype in V2_TYPES:
        values[datatype] = sample(datatype, 1)
        inp = tg.InferInput(f"in_{datatype}", [1, 3], datatype)
        inp.set_data_from_numpy(values[datatype])
        inputs.append(inp)
    result = client.infer("dtypes", inputs, request_id="all-13")
    assert result.get_response().id == "all-13"
    assert [o.name for o in result.get_response().outputs] == [f"out_{d}" for d in V2_TYPES]
    for datatype in V2_TYPES:
        assert_same(result.as_numpy(f"out_{datatype}"), values[datatype])
    wanted = [tg.InferRequestedOutput("out_FP16"), tg.InferRequestedOutput("out_BYTES")]
    result = client.infer("dtypes", inputs, outputs=wanted)
    assert [o.name for o in result.get_response().outputs] == ["out_FP16", "out_BYTES"]
    assert_same(result.as_numpy("out_FP16"), values["FP16"])


def test_classification_and_digits_equal_rest(served: GrpcServer) -> None:
    x = RNG.uniform(0, 16, (1, 1, 8, 8)).astype(np.float32)
    grpc_client = tg.InferenceServerClient(served.target)
    http_client = th.InferenceServerClient(served.server.address)
    g_in = tg.InferInput("pixels", [1, 1, 8, 8], "FP32")
    g_in.set_data_from_numpy(x)
    h_in = th.InferInput("pixels", [1, 1, 8, 8], "FP32")
    h_in.set_data_from_numpy(x)
    plain = grpc_client.infer("digits", [g_in]).as_numpy("logits")
    np.testing.assert_array_equal(plain, http_client.infer("digits", [h_in]).as_numpy("logits"))
    top = grpc_client.infer("digits", [g_in], outputs=[tg.InferRequestedOutput("logits", class_count=3)])
    rest_top = http_client.infer("digits", [h_in], outputs=[th.InferRequestedOutput("logits", class_count=3)])
    assert top.as_numpy("logits").tolist() == rest_top.as_numpy("logits").tolist()
    assert top.as_numpy("logits").shape == (1, 3)
    assert int(top.as_numpy("logits")[0, 0].split(b":")[1]) == int(np.argmax(plain))


# ---------------------------------------------------------------------------------- metadata, health
def test_health_metadata_and_config_equal_rest(served: GrpcServer) -> None:
    client = tg.InferenceServerClient(served.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
    assert not client.is_model_ready("corrupt")
    with served.server.client() as http:
        rest_server = http.get("/v2").json()
        rest_meta = http.get("/v2/models/digits").json()
        rest_config = http.get("/v2/models/digits/config").json()
    server = client.get_server_metadata(as_json=True)
    assert server == {k: rest_server[k] for k in ("name", "version", "extensions")}
    meta = client.get_model_metadata("digits", as_json=True)
    for key in ("name", "versions", "platform"):
        assert meta[key] == rest_meta[key]
    for kind in ("inputs", "outputs"):
        assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta[kind]] == rest_meta[kind]
    assert rest_meta["bnfold"]["transports"] == ["rest", "grpc"]
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["name"] == "digits" and config["max_batch_size"] == rest_config["max_batch_size"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in config["input"][0]["dims"]] == rest_config["input"][0]["dims"]
    assert config["output"][0]["label_filename"] == rest_config["output"][0]["label_filename"]
    assert client.get_model_config("id_BYTES", as_json=True)["config"]["input"][0]["data_type"] == "TYPE_STRING"


def health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)


def test_health_service_follows_readiness(served: GrpcServer, tmp_path: Path) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health(served.target, "") == serving
    assert health(served.target, "inference.GRPCInferenceService") == serving
    with pytest.raises(grpc.RpcError) as exc:
        health(served.target, "nope")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with grpc.insecure_channel(served.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == serving
        watch.cancel()
    # a server whose only model cannot load is live but not ready: NOT_SERVING, as /v2/health/ready is 503
    repo = tmp_path / "repo"
    broken = repo / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a model")
    port = free_port()
    with in_process(model_repository=repo, grpc_port=port) as srv:
        assert health(f"127.0.0.1:{port}", "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not tg.InferenceServerClient(f"127.0.0.1:{port}").is_server_ready()
        assert srv.client().get("/v2/health/ready").status_code == 503


# ------------------------------------------------------------------------------------------- errors
def grpc_error(target: str, request: service_pb2.ModelInferRequest, **kw: Any) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as exc:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, **kw)
    return exc.value


def rest_error(srv: GrpcServer, request: service_pb2.ModelInferRequest) -> tuple[int, str]:
    """The same request over REST (JSON), for the status and the message."""
    body: dict[str, Any] = {"inputs": []}
    for t in request.inputs:
        field = V2_TYPES[t.datatype].contents if t.datatype in V2_TYPES else "fp32_contents"
        data = list(getattr(t.contents, field or "fp32_contents"))
        body["inputs"].append({"name": t.name, "shape": list(t.shape), "datatype": t.datatype, "data": data})
    if request.outputs:
        body["outputs"] = [{"name": o.name} for o in request.outputs]
    path = f"/v2/models/{request.model_name}" + (f"/versions/{request.model_version}" if request.model_version else "")
    with srv.server.client() as http:
        r = http.post(path + "/infer", json=body)
    return r.status_code, r.json()["error"]


def pixels_request(model: str = "digits", shape: tuple[int, ...] = (1, 1, 8, 8), **kw: Any) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model, **kw)
    t = request.inputs.add(name="pixels", datatype="FP32", shape=list(shape))
    t.contents.fp32_contents.extend([0.5] * int(np.prod(shape)))
    return request


def renamed(request: Any, **changes: Any) -> Any:
    for key, value in changes.items():
        if key == "shape":
            del request.inputs[0].shape[:]
            request.inputs[0].shape.extend(value)
        else:
            setattr(request.inputs[0], key, value)
    return request


ERROR_CASES = {
    "unknown model": (pixels_request("nope"), grpc.StatusCode.NOT_FOUND, 404),
    "unknown version": (pixels_request(model_version="9"), grpc.StatusCode.NOT_FOUND, 404),
    "wrong input name": (renamed(pixels_request(), name="x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    "wrong datatype": (renamed(pixels_request(), datatype="FP64"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    "unknown datatype": (renamed(pixels_request(), datatype="FP8"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    "wrong shape": (pixels_request(shape=(1, 1, 4, 16)), grpc.StatusCode.INVALID_ARGUMENT, 400),
    "batch above max": (pixels_request(shape=(2, 1, 8, 8)), grpc.StatusCode.INVALID_ARGUMENT, 400),
    "element count": (renamed(pixels_request(), shape=[1, 1, 8, 7]), grpc.StatusCode.INVALID_ARGUMENT, 400),
    "model not ready": (pixels_request("corrupt"), grpc.StatusCode.UNAVAILABLE, 503),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_have_rest_meaning_and_message(served: GrpcServer, case: str) -> None:
    request, code, http_status = ERROR_CASES[case]
    error = grpc_error(served.target, request)
    status, message = rest_error(served, request)
    assert (error.code(), error.details()) == (code, message)
    assert status == http_status


def test_request_mistakes_only_grpc_has(served: GrpcServer) -> None:
    fp16 = service_pb2.ModelInferRequest(model_name="id_FP16")
    fp16.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1, 2, 3])
    error = grpc_error(served.target, fp16)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in error.details()
    short = pixels_request()
    short.inputs[0].ClearField("contents")
    short.raw_input_contents.append(b"\0" * 255)
    error = grpc_error(served.target, short)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "input 'pixels': raw_input_contents has 255 bytes, shape [1, 1, 8, 8] of FP32 needs 256"
    both = pixels_request()
    both.raw_input_contents.append(b"\0" * 256)
    assert "both contents and raw_input_contents" in grpc_error(served.target, both).details()
    wide = service_pb2.ModelInferRequest(model_name="id_UINT8")
    wide.inputs.add(name="x", datatype="UINT8", shape=[1, 3]).contents.uint_contents.extend([1, 256, 3])
    assert grpc_error(served.target, wide).details() == "input 'x': a value is out of the UINT8 range"
    bad_output = pixels_request()
    bad_output.outputs.add(name="nope")
    assert grpc_error(served.target, bad_output).details() == rest_error(served, bad_output)[1]
    bad_param = pixels_request()
    bad_param.parameters["timeout"].string_param = "soon"
    assert grpc_error(served.target, bad_param).details() == rest_error_with(served, {"timeout": "soon"})


def rest_error_with(srv: GrpcServer, parameters: dict[str, Any]) -> str:
    body = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
    with srv.server.client() as http:
        return str(http.post("/v2/models/digits/infer", json={**body, "parameters": parameters}).json()["error"])


def slow_request(**parameters: int) -> Any:
    request = service_pb2.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 384]).contents.fp32_contents.extend([0.5] * 384)
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


def test_timeout_parameter_and_grpc_deadline_are_deadline_exceeded(served: GrpcServer) -> None:
    error = grpc_error(served.target, slow_request(timeout=1000))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout" in error.details()
    assert grpc_error(served.target, slow_request(), timeout=0.001).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with grpc.insecure_channel(served.target) as channel:  # a generous deadline: answered
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(slow_request(timeout=60_000_000), timeout=60).outputs[0].name == "y"


def test_api_key_from_metadata(limited: GrpcServer) -> None:
    client = tg.InferenceServerClient(limited.target)
    assert client.is_server_live() and client.is_server_ready()  # health needs no key, as over REST
    inp = tg.InferInput("pixels", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        with pytest.raises(InferenceServerException) as exc:
            client.infer("digits", [inp], headers=headers)
        assert exc.value.status() == "StatusCode.UNAUTHENTICATED"
        assert exc.value.message() == "missing or wrong API key (Authorization: Bearer <key>)"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("digits", headers=headers)
    assert client.infer("digits", [inp], headers=BEARER).as_numpy("logits").shape == (1, 10)
    assert client.get_model_metadata("digits", headers=BEARER).name == "digits"


def test_message_size_limit_is_the_body_limit(limited: GrpcServer) -> None:
    request = pixels_request(shape=(1, 1, 128, 130))  # 66,560 bytes of floats: above 64 KiB
    error = grpc_error(limited.target, request, metadata=tuple(BEARER.items()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    fits = pixels_request(shape=(1, 1, 100, 100))  # 40,000 bytes: read, then refused by the model
    assert grpc_error(limited.target, fits, metadata=tuple(BEARER.items())).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_full_queue_is_unavailable_with_retry_after(limited: GrpcServer) -> None:
    """One call computing (held inside ONNX Runtime) and one queued fill both places: every further call is
    UNAVAILABLE at once, with Retry-After; once the held run goes, both admitted calls are answered."""
    metadata = tuple(BEARER.items())

    def call() -> Any:
        with grpc.insecure_channel(limited.target) as channel:
            return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                slow_request(), metadata=metadata, timeout=120
            )

    pool = cf.ThreadPoolExecutor(2)
    with hold_inference(1) as held:
        first = pool.submit(call)
        held.wait_entered()
        second = pool.submit(call)
        wait_until(lambda: metric(limited.server, "bnfold_requests_in_flight", KEY) == 2, 60, what="both places taken")
        for _ in range(3):
            error = grpc_error(limited.target, slow_request(), metadata=metadata, timeout=60)
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert error.details().startswith("server busy: 2 requests in flight (limit 2)"), error.details()
            assert dict(error.trailing_metadata() or ()).get("retry-after") == "2"
        held.release()
        assert first.result(120).outputs[0].name == "y"
        assert second.result(120).outputs[0].name == "y"
    pool.shutdown()


def test_metrics_name_the_transport(served: GrpcServer) -> None:
    def count(name: str, *labels: str) -> float:
        with served.server.client() as http:
            text = http.get("/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith(name + "{") and all(x in ln for x in labels)]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    ok = ('model="static"', 'transport="grpc"')
    before = count("bnfold_inference_success_total", *ok), count("bnfold_inference_failure_total", *ok)
    client = tg.InferenceServerClient(served.target)
    inp = tg.InferInput("x", [3], "FP32")
    inp.set_data_from_numpy(np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(client.infer("static", [inp]).as_numpy("y"), [2, 4, 6])
    bad = tg.InferInput("x", [4], "FP32")
    bad.set_data_from_numpy(np.array([1, 2, 3, 4], np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("static", [bad])
    assert count("bnfold_inference_success_total", *ok) == before[0] + 1
    assert count("bnfold_inference_failure_total", *ok, 'error="invalid_argument"') == before[1] + 1
    assert count("bnfold_request_duration_seconds_count", *ok) >= 1


# ---------------------------------------------------------------------------------- processes, signals
@pytest.mark.slow
def test_every_worker_process_serves_grpc(grepo: Path, tmp_path: Path) -> None:
    srv = start_grpc(tmp_path, "--model-repository", str(grepo), "--workers", "2")
    try:
        wait_until(lambda: srv.server.output().count("gRPC (V2") == 2, 120, what="both workers listening")
        client = tg.InferenceServerClient(srv.target)
        inp = tg.InferInput("x", [3], "FP32")
        inp.set_data_from_numpy(np.array([1, 2, 3], np.float32))
        for _ in range(4):
            np.testing.assert_array_equal(client.infer("static", [inp]).as_numpy("y"), [2, 4, 6])
    finally:
        assert srv.server.stop() == 0, srv.server.output()[-2000:]


@pytest.mark.slow
def test_sigterm_under_grpc_load_loses_no_accepted_request(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    save(slow_model(384, 96), repo, "slower", config='{"max_batch_size": 0}')  # ~0.2-0.6 s per run
    env = {"BNFOLD_MAX_CONCURRENCY": "1", "BNFOLD_MAX_QUEUE": "64", "BNFOLD_GRACEFUL_SHUTDOWN_SECONDS": "120"}
    srv = start_grpc(tmp_path, "--model-repository", str(repo), env=env)
    x = np.full((1, 384), 0.5, np.float32)
    want = ort.InferenceSession(slow_model(384, 96).SerializeToString()).run(None, {"x": x})[0]
    total = 6
    results: list[tuple[str, Any]] = []
    lock = threading.Lock()

    def call() -> None:
        client = tg.InferenceServerClient(srv.target)
        inp = tg.InferInput("x", [1, 384], "FP32")
        inp.set_data_from_numpy(x)
        try:
            outcome: tuple[str, Any] = ("ok", client.infer("slower", [inp], client_timeout=300).as_numpy("y"))
        except InferenceServerException as exc:
            outcome = ("error", f"{exc.status()} {exc.message()}")
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=call) for _ in range(total)]
    for t in threads:
        t.start()
    # every call admitted (one computing, the others queued) before the signal
    wait_until(lambda: metric(srv.server, "bnfold_requests_in_flight") == total, 60, 0.01, "calls in flight")
    os.kill(srv.server.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join()
    assert srv.server.proc.wait(120) == 0, srv.server.output()[-3000:]
    assert [r[0] for r in results] == ["ok"] * total, results
    for _, value in results:
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
    log = srv.server.output()
    assert "readiness off" in log and "Finished server process" in log
