"""Dynamic batching: every request answered with its own batch-of-one result, whoever it shared a run with.

Batches are made certain rather than timed: with one compute slot, the first request's ONNX Runtime run is held
(:func:`hold_inference`) while the next ones queue (observed in the in-flight gauge), so the test knows exactly
which requests must share the next run. The mass test mixes REST JSON, REST binary and gRPC clients against a real
server and checks every answer against an in-process batch-of-one run of the same model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc.aio as grpcclient
import tritonclient.http.aio as httpclient
from prometheus_client.parser import text_string_to_metric_families

from service.errors import ModelLoadError
from service.runtime.loading import load_model
from service.runtime.model_config import ModelConfig
from service.settings import Settings
from tests.support.batching_models import FEATURES, build_batching_repository, mlp_model
from tests.support.grpc_servers import start_grpc
from tests.support.reliability import metric, wait_until
from tests.support.servers import InThread, hold_inference, in_process

MAX_BATCH = 8


@pytest.fixture(scope="module")
def batch_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_batching_repository(tmp_path_factory.mktemp("batch-repo"), MAX_BATCH)


@pytest.fixture(scope="module")
def one_slot(batch_repo: Path) -> Iterator[InThread]:
    """One compute slot: while its run is held, every other request of a model queues for the next batch."""
    with in_process(model_repository=batch_repo, max_concurrency=1) as srv:
        yield srv


def reference() -> ort.InferenceSession:
    return ort.InferenceSession(mlp_model().SerializeToString(), providers=["CPUExecutionProvider"])


def row(i: int) -> np.ndarray:
    """A distinct input per request, so a swapped answer cannot pass."""
    return np.random.default_rng(i).standard_normal((1, FEATURES)).astype(np.float32)


def json_request(i: int, outputs: list[str] | None = None, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"r{i}",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, FEATURES], "data": row(i).ravel().tolist()}],
    }
    if outputs is not None:
        body["outputs"] = [{"name": n, "parameters": params} for n in outputs]
    return body


def samples(srv: Any, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The Prometheus samples called ``name`` whose labels include ``labels``."""
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]


def sample(srv: Any, name: str, **labels: str) -> float:
    return sum(v for _, v in samples(srv, name, **labels))


def batches(srv: Any, model: str) -> tuple[float, float]:
    """(ONNX Runtime runs, rows) of a batched model so far."""
    return sample(srv, "bnfold_inference_exec_count_total", model=model), sample(
        srv, "bnfold_batch_size_sum", model=model
    )


def batches_up_to(srv: Any, model: str, rows: int) -> float:
    """Runs of ``model`` with at most ``rows`` rows, from the batch size histogram's cumulative buckets."""
    buckets = samples(srv, "bnfold_batch_size_bucket", model=model)
    return next(v for labels, v in buckets if labels["le"] != "+Inf" and float(labels["le"]) == rows)


def post_all(
    srv: InThread, model: str, bodies: list[dict[str, Any]], queued: int | None = None
) -> list[httpx.Response]:
    """Send ``bodies`` while one run of ``model`` is held; once ``queued`` of them (default all) are in flight,
    release it; the answers."""
    pool = cf.ThreadPoolExecutor(len(bodies) + 1)
    with hold_inference(1) as held:
        first = pool.submit(httpx.post, f"{srv.url}/v2/models/{model}/infer", json=bodies[0], timeout=60)
        held.wait_entered()
        rest = [pool.submit(httpx.post, f"{srv.url}/v2/models/{model}/infer", json=b, timeout=60) for b in bodies[1:]]
        wait_until(
            lambda: metric(srv, "bnfold_requests_in_flight") == (queued or len(bodies)), 60, what="requests admitted"
        )
        held.release()
        answers = [first.result(), *(f.result() for f in rest)]
    pool.shutdown()
    return answers


def test_queued_requests_share_one_run_and_keep_their_own_answers(one_slot: InThread) -> None:
    runs0, rows0 = batches(one_slot, "mlp")
    wanted: list[list[str] | None] = [None, ["logits"], ["hidden"], ["logits", "hidden"], ["logits"]]
    bodies = [json_request(i, w) for i, w in enumerate(wanted)]
    answers = post_all(one_slot, "mlp", bodies)
    runs, rows = batches(one_slot, "mlp")
    # the held request ran alone; the four queued behind it ran as one batch
    assert (runs - runs0, rows - rows0) == (2, 5)
    ref = reference()
    for i, (answer, want) in enumerate(zip(answers, wanted, strict=True)):
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["id"] == f"r{i}"
        names = [o["name"] for o in got["outputs"]]
        assert names == (want or ["hidden", "logits"])
        expected = dict(zip(["hidden", "logits"], ref.run(["hidden", "logits"], {"x": row(i)}), strict=True))
        for out in got["outputs"]:
            value = np.array(out["data"], np.float32).reshape(out["shape"])
            np.testing.assert_allclose(value, expected[out["name"]], rtol=1e-5, atol=1e-5)


def test_a_batch_never_exceeds_max_batch_size(one_slot: InThread) -> None:
    runs0, rows0 = batches(one_slot, "mlp")
    answers = post_all(one_slot, "mlp", [json_request(100 + i) for i in range(2 * MAX_BATCH + 2)])
    assert all(a.status_code == 200 for a in answers)
    runs, rows = batches(one_slot, "mlp")
    # 1 held, then 17 queued: 8 + 8 + 1
    assert (runs - runs0, rows - rows0) == (4, 2 * MAX_BATCH + 2)
    assert batches_up_to(one_slot, "mlp", MAX_BATCH) == runs, "a batch above max_batch_size"


def test_requests_of_other_shapes_are_not_joined(one_slot: InThread) -> None:
    def body(n: int, v: float) -> dict[str, Any]:
        return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, n], "data": [v] * n}]}

    runs0, rows0 = batches(one_slot, "ragged")
    answers = post_all(one_slot, "ragged", [body(3, 0), body(3, 1), body(5, 2), body(3, 3), body(5, 4)])
    runs, rows = batches(one_slot, "ragged")
    assert (runs - runs0, rows - rows0) == (3, 5)  # held alone, then n=3 (two) and n=5 (two) in separate runs
    for v, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [2.0 * v] * answer.json()["outputs"][0]["shape"][1]


def test_a_request_that_fails_the_model_does_not_fail_its_neighbours(one_slot: InThread) -> None:
    def body(index: int) -> dict[str, Any]:
        return {"inputs": [{"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": [index]}]}

    answers = post_all(one_slot, "gather", [body(0), body(1), body(99), body(3), body(4)])
    codes = [a.status_code for a in answers]
    assert codes == [200, 200, 400, 200, 200], [a.text for a in answers]
    assert "rejected the inputs" in answers[2].json()["error"]
    for index, answer in zip([0, 1, 3, 4], [answers[i] for i in (0, 1, 3, 4)], strict=True):
        assert answer.json()["outputs"][0]["data"] == [4.0 * index + k for k in range(4)]


def test_invalid_requests_are_answered_alone_before_joining(one_slot: InThread) -> None:
    bad_shape = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    bad_output = json_request(7, ["nope"])
    answers = post_all(one_slot, "mlp", [json_request(5), bad_shape, json_request(6), bad_output], queued=2)
    assert [a.status_code for a in answers] == [200, 400, 200, 400]


def test_a_deadline_expiring_in_the_queue_is_answered_and_never_computed(one_slot: InThread) -> None:
    runs0, rows0 = batches(one_slot, "mlp")
    pool = cf.ThreadPoolExecutor(3)
    with hold_inference(1) as held:
        first = pool.submit(httpx.post, f"{one_slot.url}/v2/models/mlp/infer", json=json_request(20), timeout=60)
        held.wait_entered()
        late = json_request(21)
        late["parameters"] = {"timeout": 1000}  # 1 ms: it expires while the held run blocks the only slot
        expired = httpx.post(f"{one_slot.url}/v2/models/mlp/infer", json=late, timeout=60)
        held.release()
        assert first.result().status_code == 200
    pool.shutdown()
    assert expired.status_code == 504, expired.text
    assert "in the queue" in expired.json()["error"]
    runs, rows = batches(one_slot, "mlp")
    assert (runs - runs0, rows - rows0) == (1, 1)  # only the held request ran


def test_a_cancelled_grpc_request_leaves_its_batch(batch_repo: Path) -> None:
    """A gRPC client that gives up while queued is dropped; its neighbours are answered; nothing hangs."""
    from service.launcher import free_port

    port = free_port()
    with in_process(model_repository=batch_repo, max_concurrency=1, grpc_port=port) as srv:

        async def scenario() -> tuple[list[int], Any]:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            try:

                async def infer(i: int, timeout: float | None = None) -> Any:
                    x = grpcclient.InferInput("x", [1, FEATURES], "FP32")
                    x.set_data_from_numpy(row(i))
                    return await client.infer("mlp", [x], request_id=f"g{i}", client_timeout=timeout)

                with hold_inference(1) as held:
                    first = asyncio.ensure_future(infer(30))
                    await asyncio.get_running_loop().run_in_executor(None, held.wait_entered)
                    gone = asyncio.ensure_future(infer(31))
                    kept = asyncio.ensure_future(infer(32))
                    await asyncio.get_running_loop().run_in_executor(
                        None,
                        lambda: wait_until(lambda: metric(srv, "bnfold_requests_in_flight") == 3, 60, what="admitted"),
                    )
                    gone.cancel()  # the client goes away: grpc cancels the call
                    await asyncio.get_running_loop().run_in_executor(
                        None,
                        lambda: wait_until(lambda: metric(srv, "bnfold_requests_in_flight") == 2, 60, what="dropped"),
                    )
                    held.release()
                    results = [await first, await kept]
                return [int(r.get_response().id[1:]) for r in results], results
            finally:
                await client.close()

        ids, results = asyncio.run(scenario())
        assert ids == [30, 32]
        ref = reference()
        np.testing.assert_allclose(results[1].as_numpy("logits"), ref.run(["logits"], {"x": row(32)})[0], rtol=1e-5)
        assert sample(srv, "bnfold_inference_failure_total", model="mlp") >= 1  # counted as the client gone


def test_a_model_asking_for_batching_without_a_batch_dimension_fails_to_load(batch_repo: Path) -> None:
    config = ModelConfig.read(batch_repo / "fixed" / "config.json")
    with pytest.raises(ModelLoadError, match=r"input 'x' has shape \[1, 4\]"):
        load_model("fixed", "1", batch_repo / "fixed" / "1" / "model.onnx", config, Settings(warmup_runs=0))
    # the server serves the others, and says so
    with in_process(model_repository=batch_repo) as srv:
        assert httpx.get(f"{srv.url}/v2/models/fixed/ready").status_code != 200
        assert httpx.get(f"{srv.url}/v2/models/mlp/ready").status_code == 200
        meta = httpx.get(f"{srv.url}/v2/models/mlp").json()["bnfold"]["dynamic_batching"]
        assert meta == {"max_batch_size": MAX_BATCH, "max_queue_delay_microseconds": 0, "preferred_batch_size": []}
        assert httpx.get(f"{srv.url}/v2/models/mlp_plain").json()["bnfold"]["dynamic_batching"] is None


def test_server_wide_default_batches_models_without_a_say(batch_repo: Path) -> None:
    with in_process(model_repository=batch_repo, dynamic_batching=True) as srv:
        meta = httpx.get(f"{srv.url}/v2/models/mlp_plain").json()["bnfold"]["dynamic_batching"]
        assert meta is not None and meta["max_batch_size"] == MAX_BATCH


# ------------------------------------------------------------------------------------------------ mass test
PER_TRANSPORT = 600
CONCURRENCY = 48


async def _rest_json(url: str, ids: list[int]) -> dict[int, tuple[int, Any]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    out: dict[int, tuple[int, Any]] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=CONCURRENCY)) as c:

        async def one(i: int) -> None:
            kind = i % 4
            body: dict[str, Any]
            if kind == 3:  # invalid: wrong feature count
                body = {
                    "id": f"r{i}",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
                }
            elif kind == 2:
                body = json_request(i, ["logits"], classification=3)
            else:
                body = json_request(i, [["hidden"], ["logits", "hidden"]][kind])
            async with sem:
                r = await c.post("/v2/models/mlp/infer", content=json.dumps(body))
            out[i] = (r.status_code, r.json())

        await asyncio.gather(*(one(i) for i in ids))
    return out


async def _rest_binary(address: str, ids: list[int]) -> dict[int, tuple[int, Any]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    out: dict[int, tuple[int, Any]] = {}
    client = httpclient.InferenceServerClient(address, conn_limit=CONCURRENCY)
    try:

        async def one(i: int) -> None:
            x = httpclient.InferInput("x", [1, FEATURES], "FP32")
            x.set_data_from_numpy(row(i), binary_data=True)
            wanted = [httpclient.InferRequestedOutput("logits", binary_data=True)]
            async with sem:
                r = await client.infer("mlp", [x], request_id=f"r{i}", outputs=wanted)
            out[i] = (200, r)

        await asyncio.gather(*(one(i) for i in ids))
    finally:
        await client.close()
    return out


async def _grpc(target: str, ids: list[int]) -> dict[int, tuple[int, Any]]:
    sem = asyncio.Semaphore(CONCURRENCY)
    out: dict[int, tuple[int, Any]] = {}
    client = grpcclient.InferenceServerClient(target)
    try:

        async def one(i: int) -> None:
            x = grpcclient.InferInput("x", [1, FEATURES], "FP32")
            x.set_data_from_numpy(row(i))
            async with sem:
                r = await client.infer("mlp", [x], request_id=f"r{i}")
            out[i] = (200, r)

        await asyncio.gather(*(one(i) for i in ids))
    finally:
        await client.close()
    return out


@pytest.mark.slow
def test_thousands_of_concurrent_requests_over_three_transports_equal_batch_of_one(
    batch_repo: Path, tmp_path: Path
) -> None:
    server = start_grpc(tmp_path, "--model-repository", str(batch_repo))
    try:
        n = PER_TRANSPORT
        json_ids, binary_ids, grpc_ids = range(0, n), range(n, 2 * n), range(2 * n, 3 * n)

        async def everything() -> list[dict[int, tuple[int, Any]]]:
            return list(
                await asyncio.gather(
                    _rest_json(server.server.url, list(json_ids)),
                    _rest_binary(server.server.address, list(binary_ids)),
                    _grpc(server.target, list(grpc_ids)),
                )
            )

        by_json, by_binary, by_grpc = asyncio.run(everything())
        ref = reference()
        expected = {
            i: dict(zip(["hidden", "logits"], ref.run(["hidden", "logits"], {"x": row(i)}), strict=True))
            for i in range(3 * n)
        }

        def close(got: np.ndarray, want: np.ndarray) -> None:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            assert got.argmax() == want.argmax()

        for i, (status, body) in by_json.items():
            kind = i % 4
            if kind == 3:
                assert status == 400 and "error" in body
                continue
            assert status == 200, body
            assert body["id"] == f"r{i}"
            outs = {o["name"]: o for o in body["outputs"]}
            if kind == 2:  # classification of the logits: top three as value:index:label
                top = [s.split(":") for s in outs["logits"]["data"]]
                order = np.argsort(-expected[i]["logits"][0])[:3]
                assert [int(t[1]) for t in top] == order.tolist()
                assert [t[2] for t in top] == [f"class-{k}" for k in order]
                continue
            assert set(outs) == ({"hidden"} if kind == 0 else {"logits", "hidden"})
            for name, out in outs.items():
                close(np.array(out["data"], np.float32).reshape(out["shape"]), expected[i][name])
        for i, (_, result) in by_binary.items():
            assert result.get_response()["id"] == f"r{i}"
            close(result.as_numpy("logits"), expected[i]["logits"])
        for i, (_, result) in by_grpc.items():
            assert result.get_response().id == f"r{i}"
            close(result.as_numpy("logits"), expected[i]["logits"])
        assert len(by_json) + len(by_binary) + len(by_grpc) == 3 * n

        runs, rows = batches(server.server, "mlp")
        valid = 3 * n - len([i for i in json_ids if i % 4 == 3])
        assert rows == valid  # every valid request computed exactly once
        assert runs < valid, "no request was ever batched"
        assert batches_up_to(server.server, "mlp", MAX_BATCH) == runs, "a batch above max_batch_size"
    finally:
        assert server.server.stop() == 0, server.server.tail()
