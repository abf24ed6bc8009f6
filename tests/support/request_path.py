"""Which service modules one inference visits, and in which direction: one REST and one gRPC ``ModelInfer``
request through an in-process :class:`~service.server.Server` (bundled ``digits`` model), traced with
``sys.setprofile`` on the event loop's thread and ``threading.setprofile`` on the compute threads.

A module is *visited* when one of its Python functions is entered during the request (dataclass-generated
methods have no file and do not count). Each call from one service module into another is an *edge* (caller,
callee, thread); ``python -m tests.support.request_path`` prints both for the two transports.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import orjson

from service.grpc.http2 import Call
from service.grpc.protos import grpc_predict_v2_pb2 as pb
from service.server import Server
from service.settings import Settings

SERVICE = Path(__import__("service").__file__).resolve().parent
ROOT = SERVICE.parent


def module_of(filename: str) -> str | None:
    path = Path(filename)
    if not path.is_absolute() or SERVICE not in path.parents:
        return None
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass
class Trace:
    """The modules entered, in order of first entry, per thread kind; the cross-module calls."""

    modules: list[str] = field(default_factory=list)
    by_thread: dict[str, list[str]] = field(default_factory=dict)
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (caller, callee, thread)
    recording: bool = False

    def profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.recording:
            return
        callee = module_of(frame.f_code.co_filename)
        if callee is None:
            return
        thread = "compute" if threading.current_thread().name.startswith("bnfold-infer") else "event loop"
        if callee not in self.modules:
            self.modules.append(callee)
        seen = self.by_thread.setdefault(thread, [])
        if callee not in seen:
            seen.append(callee)
        caller = module_of(frame.f_back.f_code.co_filename) if frame.f_back is not None else None
        if caller is not None and caller != callee and (caller, callee, thread) not in self.edges:
            self.edges.append((caller, callee, thread))


PIXELS = np.zeros((1, 1, 8, 8), np.float32)


async def rest_infer(app: Any) -> int:
    body = orjson.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-length", b"%d" % len(body))]
    scope = {"type": "http", "method": "POST", "path": "/v2/models/digits/infer", "headers": headers}
    await app(scope, receive, send)
    return int(sent[0]["status"])


async def grpc_infer(inference: Any) -> bytes:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 1, 8, 8])
    request.raw_input_contents.append(PIXELS.tobytes())
    call = Call("/inference.GRPCInferenceService/ModelInfer", {}, None)
    answer: bytes = await inference.model_infer(request.SerializeToString(), call)
    return answer


def trace_both() -> dict[str, Trace]:
    """One REST (JSON) and one gRPC (raw contents) inference, each traced after one untraced warm-up."""
    from service.grpc.server import Inference

    traces = {"rest": Trace(), "grpc": Trace()}
    server = Server(Settings(grpc_port=0, warmup_runs=1, reuse_large_buffers=False))
    active: list[Trace] = [traces["rest"]]

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        active[0].profile(frame, event, arg)

    async def main() -> None:
        threading.setprofile(profile)  # the compute threads start inside server.start()
        try:
            await server.start()
        finally:
            threading.setprofile(None)
        inference = Inference(server.dataplane)
        try:
            for kind, call in (("rest", lambda: rest_infer(server.app)), ("grpc", lambda: grpc_infer(inference))):
                await call()  # warm-up
                active[0] = traces[kind]
                traces[kind].recording = True
                sys.setprofile(profile)
                try:
                    await call()
                finally:
                    sys.setprofile(None)
                    traces[kind].recording = False
        finally:
            await server.stop()

    asyncio.run(main())
    return traces


def main() -> int:
    for kind, trace in trace_both().items():
        print(f"{kind}: {len(trace.modules)} service modules visited")
        for thread, modules in trace.by_thread.items():
            print(f"  {thread:<10} " + " -> ".join(m.removeprefix("service.") for m in modules))
        calls = [f"{a.removeprefix('service.')}->{b.removeprefix('service.')} ({t})" for a, b, t in trace.edges]
        print("  calls between modules: " + ", ".join(calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
