"""Small tools for the reliability tests: exact raw HTTP/1.1 on 127.0.0.1, server RSS, metrics, tiny models."""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.support.servers import InThread, Server

DIGITS = {"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}
SLOW = {"inputs": [{"name": "x", "shape": [1, 384], "datatype": "FP32", "data": [0.5] * 384}]}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def request_bytes(
    method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None, close: bool = True
) -> bytes:
    """One HTTP/1.1 request exactly as written: the target is sent byte for byte (no normalisation)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    hdrs = {"Content-Length": str(len(body)), **(headers or {})} if method != "GET" or body else dict(headers or {})
    if close:
        hdrs.setdefault("Connection", "close")
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def read_reply(sock: socket.socket) -> Reply:
    """Read one response (Content-Length framed, as uvicorn frames every bnfold answer) from ``sock``."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} bytes of the response head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = {}
    for line in header_lines:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {len(rest)} of {length} body bytes")
        rest += chunk
    return Reply(status, headers, rest[:length])


def raw(port: int, data: bytes, timeout: float = 30) -> Reply:
    """Send ``data`` on a new connection to 127.0.0.1:``port`` and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_reply(sock)


def refused(port: int) -> bool:
    """A new connection is refused: the listener is closed."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def call(
    port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None, timeout: float = 30
) -> Reply:
    return raw(port, request_bytes(method, target, body, headers), timeout)


def infer_body(inputs: list[dict], **extra: object) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB, from /proc/<pid>/status (VmRSS)."""
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of ``pid`` in MB."""
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match is not None
    return int(match.group(1)) / 1024


def reset_hwm(pid: int) -> None:
    """Reset the kernel's peak-RSS mark of ``pid`` (``5`` to clear_refs), so VmHWM shows only what comes next."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def metric(server: Server | InThread, name: str, key: str | None = None) -> float:
    """Sum of a Prometheus sample over its labels (0 when absent); ``key``: the server's API key, if it has one."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    text = call(server.port, "GET", "/metrics", headers=headers).body.decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate: object, timeout: float, every: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(every)
    raise AssertionError(f"{what} not reached in {timeout} s")


def scale_model(factor: float, size: int = 4, pad_to: int = 0) -> onnx.ModelProto:
    """x [size] -> factor·x, static shape; ``pad_to`` adds an unused initializer so the file has that many bytes."""
    inits = [numpy_helper.from_array(np.array(factor, np.float32), "k")]
    if pad_to:
        inits.append(numpy_helper.from_array(np.zeros(pad_to // 4, np.float32), "unused_padding"))
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m
