"""Real `bnfold serve` processes on 127.0.0.1 for the tests, and the small models they serve."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.datatypes import V2_TYPES as DATATYPE_ROWS
from service.settings import BUNDLED_REPOSITORY

V2_TYPES = {name: row.onnx for name, row in DATATYPE_ROWS.items()}


def save(model: onnx.ModelProto, repo: Path, name: str, version: int = 1, config: str | None = None) -> Path:
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if config is not None:
        (repo / name / "config.json").write_text(config)
    return path


def _model(nodes: list, inputs: list, outputs: list, inits: list | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits or [])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def dtypes_model() -> onnx.ModelProto:
    """One Identity per V2 datatype: in_<T> [batch, 3] -> out_<T>."""
    nodes, ins, outs = [], [], []
    for name, elem in V2_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        ins.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", 3]))
        outs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", 3]))
    return _model(nodes, ins, outs)


def slow_model(size: int = 384, repeats: int = 24) -> onnx.ModelProto:
    """x [1, size] tiled to [size, size], then ``repeats`` MatMuls with one shared weight: tens of ms per run."""
    w = (np.random.default_rng(0).standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([size, 1], np.int64), "reps")]
    nodes = [helper.make_node("Tile", ["x", "reps"], ["h0"])]
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("ReduceMean", [f"h{repeats}"], ["y"], keepdims=0))
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )


def static_model() -> onnx.ModelProto:
    """No batch dimension: x [3] -> 2x."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    return _model(
        [helper.make_node("Mul", ["x", "two"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
        [two],
    )


def build_repository(root: Path) -> Path:
    """digits (v1 and v2), dtypes, slow, static, and a corrupt model."""
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    shutil.copytree(root / "digits" / "1", root / "digits" / "2")
    save(dtypes_model(), root, "dtypes")
    save(slow_model(), root, "slow", config='{"max_batch_size": 0}')
    save(static_model(), root, "static")
    corrupt = root / "corrupt" / "1" / "model.onnx"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)  # type: ignore[arg-type]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def start(tmp: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True, timeout: float = 90) -> Server:
    """Start `python -m service serve ARGS` on a free port; wait until live (and ready, if asked)."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    # gRPC off unless a test asks for it (BNFOLD_GRPC_PORT in env): its default port 8001 is shared by all
    full_env = {**os.environ, "BNFOLD_WARMUP_RUNS": "1", "BNFOLD_GRPC_PORT": "0", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", *args, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    server = Server(proc, port, log)
    path = "/v2/health/ready" if ready else "/v2/health/live"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()[-3000:]}")
        try:
            if httpx.get(server.url + path, timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not {'ready' if ready else 'live'} in {timeout} s:\n{server.output()[-3000:]}")
