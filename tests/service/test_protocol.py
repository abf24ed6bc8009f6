"""A real server on 127.0.0.1 and unmodified clients: tritonclient.http, plain HTTP (curl-like), the V2 spec."""

from __future__ import annotations

import gzip
import json
import threading
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException

from converter import convert
from service.settings import BUNDLED_REPOSITORY
from tests.support.reliability import metric
from tests.support.servers import V2_TYPES, InThread, hold_inference

DIGITS = BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx"
RNG = np.random.default_rng(0)


def pixels(batch: int = 1) -> np.ndarray:
    return RNG.uniform(0, 16, (batch, 1, 8, 8)).astype(np.float32)


def in_process(model: object, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]


@pytest.fixture(scope="module")
def client(server: InThread) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(url=server.address)


def test_health_and_server_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "bnfold" and "binary_tensor_data" in meta["extensions"]
    assert "classification" in meta["extensions"]


def test_model_metadata_says_what_was_folded_and_on_which_provider(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("digits")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    folded = meta["bnfold"]["folded"]
    assert [f["name"] for f in folded["folded"]] == ["bn1", "bn2", "bn3"] and folded["kept"] == []
    assert folded["verification"]["passed"] is True
    assert meta["bnfold"]["providers"] == ["CPUExecutionProvider"]
    assert client.get_model_metadata("digits", "1")["bnfold"]["version"] == "1"
    assert client.is_model_ready("digits") and client.is_model_ready("digits", "2")


def test_model_config_in_triton_form(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("digits")
    assert config["max_batch_size"] == 1
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}]
    assert config["bnfold"]["labels"]["logits"] == [str(i) for i in range(10)]
    assert client.get_model_config("static")["max_batch_size"] == 0


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_tritonclient_inference_equals_in_process_onnx_runtime(
    client: tc.InferenceServerClient, binary_in: bool, binary_out: bool
) -> None:
    x = pixels()
    inp = tc.InferInput("pixels", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = tc.InferRequestedOutput("logits", binary_data=binary_out)
    got = client.infer("digits", [inp], outputs=[out], request_id="req-7")
    assert got.get_response()["id"] == "req-7"
    logits = got.as_numpy("logits")
    folded = convert(DIGITS).model  # what the server folded on load, the same way
    want = in_process(folded, x)
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)  # same graph; only the ORT level differs
    original = in_process(DIGITS, x)
    assert np.max(np.abs(logits - original)) <= 1e-5 * np.max(np.abs(original))


def test_every_datatype_round_trips_json_and_binary(client: tc.InferenceServerClient) -> None:
    for datatype in V2_TYPES:
        for binary in (True, False):
            if datatype == "FP16" and not binary:
                continue  # tritonclient has no JSON form for FP16: covered by the raw-HTTP test below
            if datatype == "BYTES":
                value = np.array([[b"a", "é".encode(), b""]], dtype=object)
            elif datatype == "BOOL":
                value = np.array([[True, False, True]])
            else:
                value = np.array([[1, 2, 3]]).astype(tc.triton_to_np_dtype(datatype))
            inp = tc.InferInput(f"in_{datatype}", [1, 3], datatype)
            inp.set_data_from_numpy(value, binary_data=binary)
            outs = [tc.InferRequestedOutput(f"out_{datatype}", binary_data=binary)]
            inputs = [inp] + [_zeros(n) for n in V2_TYPES if n != datatype]
            got = client.infer("dtypes", inputs, outputs=outs).as_numpy(f"out_{datatype}")
            if datatype == "BYTES":
                got = np.array([[g if isinstance(g, bytes) else g.encode() for g in got.ravel()]], dtype=object)
            np.testing.assert_array_equal(got, value, err_msg=f"{datatype} binary={binary}")


def _zeros(datatype: str) -> tc.InferInput:
    inp = tc.InferInput(f"in_{datatype}", [1, 3], datatype)
    value = np.array([[b"", b"", b""]], dtype=object) if datatype == "BYTES" else np.zeros((1, 3))
    if datatype != "BYTES":
        value = value.astype(tc.triton_to_np_dtype(datatype))
    inp.set_data_from_numpy(value, binary_data=True)
    return inp


def test_fp16_and_nested_json_over_plain_http(server: InThread) -> None:
    inputs = []
    for name in V2_TYPES:
        data: object = [["", "", ""]] if name == "BYTES" else [[False] * 3] if name == "BOOL" else [[0, 0, 0]]
        inputs.append({"name": f"in_{name}", "shape": [1, 3], "datatype": name, "data": data})
    inputs[[i["name"] for i in inputs].index("in_FP16")]["data"] = [[0.5, -1.5, 65504]]
    with server.client() as http:
        r = http.post("/v2/models/dtypes/infer", json={"inputs": inputs, "outputs": [{"name": "out_FP16"}]})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out == {"name": "out_FP16", "datatype": "FP16", "shape": [1, 3], "data": [0.5, -1.5, 65504.0]}


def test_outputs_selection_and_classification_with_labels(client: tc.InferenceServerClient) -> None:
    x = pixels()
    inp = tc.InferInput("pixels", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x)
    top = client.infer("digits", [inp], outputs=[tc.InferRequestedOutput("logits", class_count=3)])
    classes = [c.decode() if isinstance(c, bytes) else c for c in top.as_numpy("logits").ravel()]
    want = in_process(DIGITS, x)[0]
    order = np.argsort(-want)[:3]
    assert [int(c.split(":")[1]) for c in classes] == list(order)
    assert [c.split(":")[2] for c in classes] == [str(i) for i in order]  # labels from config.json
    assert float(classes[0].split(":")[0]) == pytest.approx(want[order[0]], rel=1e-5)


def test_compressed_requests_and_responses(client: tc.InferenceServerClient) -> None:
    x = pixels()
    want = in_process(convert(DIGITS).model, x)
    for req, resp in (("gzip", "gzip"), ("deflate", "deflate"), ("gzip", None), (None, "deflate")):
        inp = tc.InferInput("pixels", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        got = client.infer(
            "digits",
            [inp],
            outputs=[tc.InferRequestedOutput("logits", binary_data=False)],
            request_compression_algorithm=req,
            response_compression_algorithm=resp,
        )
        np.testing.assert_allclose(got.as_numpy("logits"), want, rtol=1e-6, atol=1e-6)


def test_large_response_is_compressed_when_accepted(server: InThread) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 384], "datatype": "FP32", "data": [0.5] * 384}]}
    raw = json.dumps(body).encode()
    with server.client() as http:
        r = http.post(
            "/v2/models/slow/infer",
            content=gzip.compress(raw),
            headers={"Content-Encoding": "gzip", "Accept-Encoding": "identity"},
        )
        assert r.status_code == 200 and "content-encoding" not in r.headers
        r = http.post(
            "/v2/models/static/infer",
            content=zlib.compress(
                json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}).encode()
            ),
            headers={"Content-Encoding": "deflate"},
        )
        assert r.json()["outputs"][0]["data"] == [2, 4, 6]


def test_raw_binary_request_single_input(server: InThread) -> None:
    x = pixels()
    with server.client() as http:
        r = http.post("/v2/models/digits/infer", content=x.tobytes(), headers={"Inference-Header-Content-Length": "0"})
    assert r.status_code == 200, r.text
    header_length = int(r.headers["Inference-Header-Content-Length"])
    header = json.loads(r.content[:header_length])
    (out,) = header["outputs"]
    assert out["parameters"]["binary_data_size"] == 40 and out["shape"] == [1, 10]
    got = np.frombuffer(r.content[header_length:], dtype="<f4").reshape(1, 10)
    np.testing.assert_allclose(got, in_process(convert(DIGITS).model, x), rtol=1e-6, atol=1e-6)


def test_versions_by_url_and_no_content_type_needed(server: InThread) -> None:
    body = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]})
    with server.client() as http:
        r = http.post("/v2/models/static/versions/1/infer", content=body, headers={"Content-Type": ""})
        assert r.status_code == 200 and r.json()["model_version"] == "1"
        r = http.post(
            "/v2/models/digits/infer",
            json={"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0] * 64}]},
        )
        assert r.json()["model_version"] == "2"  # the highest version serves by default


def test_openapi_docs_show_the_real_schemas(server: InThread) -> None:
    with server.client() as http:
        assert http.get("/docs").status_code == 200
        spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"InferenceRequest", "InferenceResponse", "ModelMetadata", "ServerMetadata", "Error"} <= set(schemas)
    infer = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert {"400", "404", "413", "503", "504"} <= set(infer["responses"])


def test_inference_never_blocks_the_event_loop(server: InThread) -> None:
    """While an inference is held inside ONNX Runtime, probes and /metrics still answer, and /metrics shows it in
    flight. Were inference on the event loop, no probe could be answered until the inference is let go, which
    happens only after the probes: the probing client times out and the test fails."""
    body = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}
    statuses: list[int] = []

    def infer() -> None:
        with server.client() as http:
            statuses.append(http.post("/v2/models/static/infer", json=body).status_code)

    with hold_inference() as held:
        thread = threading.Thread(target=infer)
        thread.start()
        held.wait_entered()
        with server.client(timeout=20) as probing:
            assert probing.get("/v2/health/live").status_code == 200
            assert probing.get("/v2/health/ready").status_code == 200
            assert metric(server, "bnfold_requests_in_flight") == 1
        held.release()
        thread.join(60)
    assert statuses == [200]


def test_64_concurrent_clients_are_absorbed_by_the_defaults(server: InThread) -> None:
    body = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}]}
    statuses: list[int] = []

    def worker() -> None:
        with server.client() as http:
            statuses.extend(http.post("/v2/models/digits/infer", json=body).status_code for _ in range(5))

    threads = [threading.Thread(target=worker) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 320


def test_metrics_count_inference_not_probes(server: InThread, tmp_path: Path) -> None:
    def value(text: str, name: str) -> float:
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and 'model="static"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    with server.client() as http:
        before = http.get("/metrics").text
        for _ in range(3):
            http.get("/v2/health/ready")
            http.get("/v2/health/live")
        body = {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}]}
        http.post("/v2/models/static/infer", json=body)
        http.post(
            "/v2/models/static/infer",
            json={"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        )
        after = http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert value(text, "bnfold_inference_success_total") - value(before, "bnfold_inference_success_total") == 1
    assert value(text, "bnfold_inference_failure_total") - value(before, "bnfold_inference_failure_total") == 1
    assert 'error="invalid_argument"' in text and 'transport="rest"' in text
    for name in (
        "bnfold_request_duration_seconds_count",
        "bnfold_queue_duration_seconds_count",
        "bnfold_compute_duration_seconds_count",
    ):
        assert value(text, name) >= 1, name
    assert 'provider="cpu"' in text
    assert 'bnfold_model_ready{model="digits",provider="cpu",version="2"} 1.0' in text
    assert "/v2/health" not in text


def test_tritonclient_sees_server_errors_as_exceptions(client: tc.InferenceServerClient) -> None:
    inp = tc.InferInput("pixels", [2, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(pixels(2))
    with pytest.raises(InferenceServerException, match="max batch size is 1") as exc:
        client.infer("digits", [inp])
    assert exc.value.status() == "400"
