"""Servers for the tests (subprocess or in-thread, both on 127.0.0.1) and the small models they serve."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from service.dataplane import DataPlane
from service.launcher import LIVE, READY, ServerProcess, ThreadServer, free_port, in_thread, launch
from service.settings import BUNDLED_REPOSITORY, Settings
from service.v2.datatypes import V2_TYPES as DATATYPE_ROWS

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


class Server(ServerProcess):
    """A ``bnfold serve`` subprocess (see :mod:`service.launcher`), with an httpx client at hand."""

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(**{"base_url": self.url, "timeout": 30, **kw})  # type: ignore[arg-type]


class InThread(ThreadServer):
    """An app served in a thread of the test process (see :func:`service.launcher.in_thread`)."""

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(**{"base_url": self.url, "timeout": 30, **kw})  # type: ignore[arg-type]

    @property
    def service(self) -> DataPlane:
        return self.app.app.state.dataplane  # type: ignore[no-any-return]


def start(tmp: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True, timeout: float = 90) -> Server:
    """Start `python -m service serve ARGS` on a free port, log in ``tmp``; wait until live (and ready, if asked).

    ``env`` is added to this process's environment (and BNFOLD_WARMUP_RUNS=1).
    """
    port = free_port()
    # gRPC off unless a test asks for it (BNFOLD_GRPC_PORT in env): its default port 8001 is shared by all
    full_env = {**os.environ, "BNFOLD_WARMUP_RUNS": "1", **(env or {})}
    launched = launch(
        args, port=port, env=full_env, log=tmp / f"server-{port}.log", ready=READY if ready else LIVE, timeout=timeout
    )
    return Server(launched.proc, launched.port, launched.log)


@contextlib.contextmanager
def in_process(**settings: Any) -> Iterator[InThread]:
    """``create_app(Settings(**settings))`` served in a thread of the test process (warm-up: one run)."""
    with in_thread(Settings(**{"warmup_runs": 1, "grpc_port": 0, **settings})) as srv:
        yield InThread(srv.app, srv.port, srv.host, srv.log)


class HeldRuns:
    """ONNX Runtime runs of this process held at the door until :meth:`release` (see :func:`hold_inference`)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.entered = threading.Semaphore(0)
        self._release = threading.Event()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.count == 0:
                return False
            self.count -= 1
            return True

    def wait_entered(self, n: int = 1, timeout: float = 60) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=timeout), "an inference never reached ONNX Runtime"

    def release(self) -> None:
        self._release.set()


@contextlib.contextmanager
def hold_inference(count: int = 1) -> Iterator[HeldRuns]:
    """The next ``count`` ``InferenceSession.run`` calls in this process (an in-thread server's) wait inside
    ONNX Runtime's Python binding until released: an inference observably in flight for as long as a test needs.
    Released on the way out, whatever happens."""
    held = HeldRuns(count)
    original = ort.InferenceSession.run

    def run(self: ort.InferenceSession, *args: Any, **kwargs: Any) -> Any:
        if held.take():
            held.entered.release()
            held._release.wait(120)
        return original(self, *args, **kwargs)

    ort.InferenceSession.run = run  # type: ignore[method-assign]
    try:
        yield held
    finally:
        held.release()
        ort.InferenceSession.run = original  # type: ignore[method-assign]
