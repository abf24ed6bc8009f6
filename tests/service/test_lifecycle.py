"""Start-up, providers, single-model mode, SIGTERM drain, and the `serve` command's own errors."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from service import cli
from service.settings import BUNDLED_REPOSITORY, Settings, unknown_variables
from tests.support.reliability import metric, wait_until
from tests.support.servers import in_process, slow_model, start

SLOW = {"inputs": [{"name": "x", "shape": [1, 384], "datatype": "FP32", "data": [0.5] * 384}]}


@pytest.mark.slow
def test_serve_with_no_arguments_serves_digits_from_any_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        srv = start(tmp_path, env=env)
    finally:
        os.chdir(cwd)
    try:
        with srv.client() as http:
            meta = http.get("/v2/models/digits").json()
            assert meta["versions"] == ["1"]
            r = http.post(
                "/v2/models/digits/infer",
                json={"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [3.0] * 64}]},
            )
            assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]
    finally:
        assert srv.stop() == 0


@pytest.mark.slow
def test_single_model_file_mode_and_sigterm_drain(tmp_path: Path) -> None:
    """Three requests admitted (one computing, about 1 s a run on an idle CPU, two queued for the single slot),
    then SIGTERM: all three complete, and the server exits 0. The graceful-shutdown window is widened so that a
    loaded machine (a run can take ten times as long) tests the drain, not the window."""
    import onnx

    path = tmp_path / "my-model.onnx"
    onnx.save(slow_model(repeats=240), str(path))
    env = {"BNFOLD_MAX_CONCURRENCY": "1", "BNFOLD_GRACEFUL_SHUTDOWN_SECONDS": "240"}
    srv = start(tmp_path, str(path), env=env)
    results: list[int] = []

    def client() -> None:
        with srv.client() as http:
            results.append(http.post("/v2/models/my-model/infer", json=SLOW).status_code)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: metric(srv, "bnfold_requests_in_flight") == 3, 60, what="three requests admitted")
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    assert srv.proc.wait(30) == 0
    assert results == [200, 200, 200]  # every request accepted before the signal completed
    log = srv.output()
    assert "readiness off" in log and "Finished server process" in log


def test_readiness_drops_the_moment_a_signal_arrives() -> None:
    """The app chains onto the server's SIGTERM handler: readiness goes first, then the server's own handler."""
    from service.server import Server, drain_on_signals

    server = Server(Settings(grpc_port=0))
    svc = server.dataplane
    svc.started = True
    svc.repository.ready_count = lambda: 1  # type: ignore[method-assign]
    assert svc.ready
    received: list[int] = []
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGTERM, lambda s, f: received.append(s))  # stands in for uvicorn's handler
        drain_on_signals(server.drain)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
    assert svc.draining and not svc.ready
    assert received == [signal.SIGTERM]


@pytest.mark.slow
def test_strict_provider_policy_refuses_to_start(tmp_path: Path) -> None:
    env = {**os.environ, "BNFOLD_PROVIDERS": "cuda,cpu", "BNFOLD_PROVIDER_POLICY": "strict"}
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "CUDAExecutionProvider" in proc.stderr and "not active" in proc.stderr


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_fallback_provider_policy_serves_and_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "bnfold"), in_process(providers=["cuda", "cpu"]) as srv, srv.client() as h:
        meta = h.get("/v2/models/digits").json()["bnfold"]
    assert meta["requested_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert meta["providers"] == ["CPUExecutionProvider"]
    assert "serving with fallback" in caplog.text


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["missing.onnx"], {}, "no such model file"),
        (["--model-repository", "/nonexistent"], {}, "model repository not found"),
        (["--port", "70000"], {}, "setting port"),
        ([], {"BNFOLD_PROVIDERS": "tpu"}, "providers must be a list of"),
        ([], {"BNFOLD_MAX_QUEUE": "-1"}, "max_queue"),
        ([], {"BNFOLD_MAX_QUEU": "3"}, "unknown setting BNFOLD_MAX_QUEU; did you mean BNFOLD_MAX_QUEUE?"),
    ],
)
def test_bad_settings_are_exit_2_one_line(
    args: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli.main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_unknown_variables_far_from_any_setting_are_only_named() -> None:
    """docker compose reads BNFOLD_IMAGE and the like from the same shell: not an error, but named."""
    assert unknown_variables({"BNFOLD_IMAGE": "x", "BNFOLD_PORT": "1", "OTHER": "y"}) == ["BNFOLD_IMAGE"]
    with pytest.raises(ValueError, match="did you mean BNFOLD_PROVIDERS"):
        unknown_variables({"BNFOLD_PROVIDER": "cpu"})


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNFOLD_PROVIDERS", "CUDA, cpu")
    monkeypatch.setenv("BNFOLD_PORT", "9001")
    monkeypatch.setenv("BNFOLD_API_KEY", "hunter2-secret")
    s = Settings()
    assert s.providers == ["cuda", "cpu"] and s.port == 9001
    assert s.api_key is not None and s.api_key.get_secret_value() == "hunter2-secret"
    assert "hunter2" not in repr(s)
    assert s.model_repository == BUNDLED_REPOSITORY


def test_repository_config_errors_leave_only_that_model_unready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "badconfig")
    (repo / "badconfig" / "config.json").write_text(json.dumps({"max_batch_size": "many"}))
    with caplog.at_level(logging.WARNING, "bnfold"), in_process(model_repository=repo) as srv, srv.client() as http:
        assert http.get("/v2/models/digits/ready").status_code == 200
        r = http.get("/v2/models/badconfig/ready")
        assert r.status_code == 503
        r = http.post("/v2/models/badconfig/infer", json={})
        assert r.status_code == 503 and "invalid config" in r.json()["error"]
    assert "model badconfig version 1 is not ready" in caplog.text


@pytest.mark.slow
def test_two_workers(tmp_path: Path) -> None:
    srv = start(tmp_path, "--workers", "2")
    try:
        with httpx.Client(base_url=srv.url) as http:
            for _ in range(10):
                assert http.get("/v2/models/digits/ready").status_code == 200
    finally:
        code = srv.stop()
    assert code == 0, srv.output()[-2000:]


@pytest.mark.parametrize(("setting", "expected"), [(0, len(os.sched_getaffinity(0))), (1, 1), (3, 3)])
def test_intra_op_threads_zero_means_the_cpus_this_process_may_use(tmp_path: Path, setting: int, expected: int) -> None:
    import onnx

    from service.runtime.loading import load_model
    from service.runtime.model_config import ModelConfig

    path = tmp_path / "model.onnx"
    onnx.save(slow_model(8, 1), str(path))
    settings = Settings(intra_op_threads=setting, warmup_runs=0)
    model = load_model("m", "1", path, ModelConfig(max_batch_size=0), settings)
    assert model.session.get_session_options().intra_op_num_threads == expected
