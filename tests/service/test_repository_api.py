"""The model repository API over REST, through tritonclient.http unmodified: index (every model, its state and
why), load (re-read from the repository, folded and verified as at start-up; a failed load leaves the serving
version serving), unload (in-flight requests finish first), all behind the API key; `GET /v2/models`; the
explicit model-control mode."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from service.settings import BUNDLED_REPOSITORY
from tests.support.reliability import wait_until
from tests.support.servers import InThread, hold_inference, in_process, save


def scale_model(factor: float) -> onnx.ModelProto:
    """x [batch, 2] -> factor·x."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    save(scale_model(2.0), root, "scale")
    corrupt = root / "corrupt" / "1" / "model.onnx"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a model")
    return root


@pytest.fixture
def server(repo: Path) -> Iterator[InThread]:
    with in_process(model_repository=repo) as srv:
        yield srv


def client(server: InThread) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.address, network_timeout=60)


def scaled(c: httpclient.InferenceServerClient) -> list[float]:
    x = httpclient.InferInput("x", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0]], np.float32))
    return c.infer("scale", [x]).as_numpy("y").ravel().tolist()  # type: ignore[no-any-return, union-attr]


def states(c: httpclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {f"{m['name']}/{m.get('version', '')}": (m["state"], m["reason"]) for m in c.get_model_repository_index()}


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; its result or exception lands in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_index_lists_every_model_with_state_and_reason(server: InThread) -> None:
    c = client(server)
    index = states(c)
    assert index["digits/1"] == ("READY", "") and index["scale/1"] == ("READY", "")
    state, reason = index["corrupt/1"]
    assert state == "UNAVAILABLE" and "not an ONNX model" in reason
    ready = c.get_model_repository_index(query_params=None)
    assert [m["name"] for m in ready] == ["corrupt", "digits", "scale"]
    with server.client() as h:
        assert h.post("/v2/repository/index", json={"ready": True}).json() == [
            {"name": "digits", "version": "1", "state": "READY", "reason": ""},
            {"name": "scale", "version": "1", "state": "READY", "reason": ""},
        ]
        assert h.get("/v2/models").json() == {"models": ["digits", "scale"]}


def test_load_rereads_the_model_and_folds_it(server: InThread, repo: Path) -> None:
    c = client(server)
    assert scaled(c) == [2.0, 4.0]
    save(scale_model(3.0), repo, "scale")  # replaced in place; no polling
    assert scaled(c) == [2.0, 4.0]
    c.load_model("scale")
    assert scaled(c) == [3.0, 6.0]
    (repo / "digits" / "1" / "model.onnx").write_bytes(
        (BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx").read_bytes()
    )
    c.load_model("digits")
    folded = c.get_model_metadata("digits")["bnfold"]["folded"]
    assert folded is not None and len(folded["folded"]) == 3  # BatchNorm folded and verified again on load


def test_a_failed_load_leaves_the_serving_version_serving(server: InThread, repo: Path) -> None:
    c = client(server)
    (repo / "scale" / "1" / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(InferenceServerException, match="not an ONNX model") as failed:
        c.load_model("scale")
    assert failed.value.status() == "400"
    assert scaled(c) == [2.0, 4.0]
    state, reason = states(c)["scale/1"]
    assert state == "READY" and "not an ONNX model" in reason
    assert c.is_model_ready("scale")


def test_unknown_model_is_404(server: InThread) -> None:
    c = client(server)
    for call in (c.load_model, c.unload_model):
        with pytest.raises(InferenceServerException, match="nope") as exc:
            call("nope")
        assert exc.value.status() == "404"


def test_unload_drains_in_flight_requests_first(server: InThread) -> None:
    c = client(server)
    with hold_inference(1) as held:
        request, answer = in_thread(lambda: scaled(client(server)))
        held.wait_entered()
        unload, unloaded = in_thread(lambda: client(server).unload_model("scale"))
        wait_until(lambda: states(c)["scale/1"][0] == "UNLOADING", 30, what="UNLOADING in the index")
        assert unload.is_alive() and not unloaded  # waits for the request in flight
        with pytest.raises(InferenceServerException, match="scale"):
            scaled(c)  # no new request gets in meanwhile
        held.release()
        request.join(60)
        unload.join(60)
    assert answer == [[2.0, 4.0]] and unloaded == [None]
    assert states(c)["scale/1"] == ("UNAVAILABLE", "unloaded")
    assert not c.is_model_ready("scale")
    c.load_model("scale")
    assert scaled(c) == [2.0, 4.0]


def test_unload_during_a_load_waits_for_it_then_unloads(server: InThread, repo: Path) -> None:
    c = client(server)
    save(scale_model(5.0), repo, "scale")
    with hold_inference(1) as held:  # the load's warm-up run
        load, loaded = in_thread(lambda: client(server).load_model("scale"))
        held.wait_entered()
        assert states(c)["scale/1"][0] == "LOADING"
        assert scaled(c) == [2.0, 4.0]  # the serving version answers while the new one loads
        unload, unloaded = in_thread(lambda: client(server).unload_model("scale"))
        wait_until(lambda: server.service.repository.waiting("scale") == 1, 30, what="the unload queued")
        assert load.is_alive() and unload.is_alive()
        held.release()
        load.join(60)
        unload.join(60)
    assert loaded == [None] and unloaded == [None]
    assert states(c)["scale/1"] == ("UNAVAILABLE", "unloaded")


def test_repository_api_is_behind_the_api_key(repo: Path) -> None:
    with in_process(model_repository=repo, api_key="s3cret") as server:
        c = client(server)
        for call in (c.get_model_repository_index, lambda: c.load_model("scale"), lambda: c.unload_model("scale")):
            with pytest.raises(InferenceServerException) as exc:
                call()
            assert exc.value.status() == "401"
        with server.client() as h:
            assert h.get("/v2/models").status_code == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert len(c.get_model_repository_index(headers=auth)) == 3
        c.unload_model("scale", headers=auth)
        c.load_model("scale", headers=auth)
        assert states_with(c, auth)["scale/1"] == ("READY", "")


def states_with(c: httpclient.InferenceServerClient, headers: dict[str, str]) -> dict[str, tuple[str, str]]:
    return {f"{m['name']}/{m['version']}": (m["state"], m["reason"]) for m in c.get_model_repository_index(headers)}


def test_explicit_mode_starts_with_none_or_the_named_set(repo: Path) -> None:
    with in_process(model_repository=repo, model_control_mode="explicit") as server:
        c = client(server)
        assert {k: s for k, (s, _) in states(c).items()} == dict.fromkeys(
            ["corrupt/1", "digits/1", "scale/1"], "UNAVAILABLE"
        )
        assert c.is_server_ready() and not c.is_model_ready("scale")
        c.load_model("scale")
        assert scaled(c) == [2.0, 4.0]
    with in_process(model_repository=repo, model_control_mode="explicit", load_models=["scale"]) as server:
        c = client(server)
        assert states(c)["scale/1"] == ("READY", "") and states(c)["digits/1"] == ("UNAVAILABLE", "not loaded")


def test_polling_leaves_an_unloaded_model_unloaded(repo: Path) -> None:
    with in_process(model_repository=repo, repository_poll_seconds=0.05) as server:
        c = client(server)
        c.unload_model("scale")
        save(scale_model(7.0), repo, "scale")  # changed on disk: polling would load it, were it not unloaded
        save(scale_model(1.0), repo, "fresh")
        wait_until(lambda: states(c).get("fresh/1") == ("READY", ""), 60, what="the poller loading a new model")
        assert states(c)["scale/1"] == ("UNAVAILABLE", "unloaded")
        c.load_model("scale")
        assert scaled(c) == [7.0, 14.0]


def test_model_control_settings_that_contradict_each_other_are_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import cli

    assert cli.main(["serve", "--load-model", "digits"]) == 2
    assert capsys.readouterr().err == (
        "bnfold: error: load_models names the models an explicit model control mode starts with\n"
    )
    monkeypatch.setenv("BNFOLD_REPOSITORY_POLL_SECONDS", "1")
    assert cli.main(["serve", "--model-control-mode", "explicit"]) == 2
    assert capsys.readouterr().err == (
        "bnfold: error: explicit model control loads only what it is asked to: it polls no repository\n"
    )


def test_load_and_unload_need_one_worker_and_no_model_in_the_request(repo: Path) -> None:
    """With several worker processes each has its own models: a load or unload would reach one of them."""
    with in_process(model_repository=repo, workers=2) as server:
        c = client(server)
        for call in (c.load_model, c.unload_model):
            with pytest.raises(InferenceServerException, match="need one worker process") as exc:
                call("scale")
            assert exc.value.status() == "400"
        assert len(c.get_model_repository_index()) == 3
    with in_process(model_repository=repo) as server:
        c = client(server)
        with pytest.raises(InferenceServerException, match=r"only from its repository: parameter\(s\) config") as exc:
            c.load_model("scale", config='{"max_batch_size": 4}')
        assert exc.value.status() == "400"
