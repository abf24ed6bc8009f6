"""The runtime contract KServe needs from `bnfold serve`: one model from a file or a directory (KServe's
/mnt/models, a ConfigMap volume), served under --model-name, on --http-port, logging JSON lines when asked."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser
from service.errors import ModelLoadError
from service.logging_setup import JsonFormatter
from service.runtime.repository import single_model_file
from service.settings import BUNDLED_REPOSITORY
from tests.support.servers import start

DIGITS = BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx"
PIXELS = {"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [3.0] * 64}]}


def configmap_volume(root: Path, files: dict[str, Path]) -> Path:
    """A directory laid out as the kubelet mounts a ConfigMap: ..<timestamp>/ files, ..data link, file links."""
    stamp = root / "..2026_12_02_12_00_00.000000001"
    stamp.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, stamp / name)
    (root / "..data").symlink_to(stamp.name)
    for name in files:
        (root / name).symlink_to(f"..data/{name}")
    return root


def test_a_file_is_itself(tmp_path: Path) -> None:
    assert single_model_file(DIGITS) == DIGITS


def test_a_directory_with_one_onnx_file_at_any_depth(tmp_path: Path) -> None:
    (tmp_path / "a" / "1").mkdir(parents=True)
    shutil.copy(DIGITS, tmp_path / "a" / "1" / "model.onnx")
    (tmp_path / "README.txt").write_text("not a model")
    assert single_model_file(tmp_path) == tmp_path / "a" / "1" / "model.onnx"


def test_a_configmap_volume_counts_its_model_once(tmp_path: Path) -> None:
    root = configmap_volume(tmp_path / "vol", {"model.onnx": DIGITS})
    assert single_model_file(root) == root / "model.onnx"


@pytest.mark.parametrize("count", [0, 2])
def test_zero_or_two_onnx_files_is_an_error_that_says_so(tmp_path: Path, count: int) -> None:
    for i in range(count):
        shutil.copy(DIGITS, tmp_path / f"m{i}.onnx")
    with pytest.raises(ModelLoadError, match=f"exactly one .onnx file, found {count}"):
        single_model_file(tmp_path)


def test_http_port_is_the_kserve_spelling_of_port() -> None:
    args = build_parser().parse_args(["serve", "--http-port=8080", "--model-name=m", "/mnt/models"])
    assert (args.port, args.model_name, args.model) == (8080, "m", Path("/mnt/models"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-name=digits"], "--model-name (BNFOLD_MODEL_NAME) names the single model"),
        (["--model-name=a b", str(DIGITS)], "setting model_name"),
        (["EMPTY_DIR"], "exactly one .onnx file, found 0"),
    ],
)
def test_bad_single_model_arguments_are_exit_2_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", *[str(tmp_path) if a == "EMPTY_DIR" else a for a in args]],
        env={k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_kserve_style_directory_named_model_and_json_logs(tmp_path: Path) -> None:
    volume = configmap_volume(tmp_path / "mnt-models", {"model.onnx": DIGITS})
    # BNFOLD_SERVICE_HOST: as a Service named bnfold would inject (service links); warned about before the
    # settings are read, in JSON too
    env = {"BNFOLD_LOG_FORMAT": "json", "BNFOLD_SERVICE_HOST": "10.96.0.10"}
    srv = start(tmp_path, "--model-name=mnist-v2", str(volume), env=env)
    try:
        with srv.client() as http:
            assert http.get("/v2/models/mnist-v2").json()["versions"] == ["1"]
            assert http.get("/v2/models/model").status_code == 404
            r = http.post("/v2/models/mnist-v2/infer", json=PIXELS)
            assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]
    finally:
        assert srv.stop() == 0
    lines = [line for line in srv.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    messages = [r["message"] for r in records]
    assert any("model mnist-v2 version 1 ready" in m for m in messages)
    assert any("readiness off" in m for m in messages)  # the SIGTERM drain, logged by the app
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own loggers too
    assert any("BNFOLD_SERVICE_HOST names no bnfold setting" in m for m in messages)


def test_json_formatter_keeps_the_traceback_on_one_line() -> None:
    try:
        raise ValueError('bad "value"\nsecond line')
    except ValueError:
        record = logging.getLogger("bnfold.test").makeRecord(
            "bnfold.test", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["message"] == "failed x"
    assert "ValueError" in entry["exception"] and entry["time"].endswith("Z")
