"""`bnfold serve` with gRPC on a free port (through servers.start), and the per-datatype test models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from onnx import helper

from service.v2.datatypes import V2_TYPES
from tests.support.servers import InThread, Server, _model, build_repository, free_port, save, start


@dataclass
class GrpcServer:
    server: Server | InThread
    grpc_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def start_grpc(tmp: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True) -> GrpcServer:
    port = free_port()
    return GrpcServer(start(tmp, *args, env={"BNFOLD_GRPC_PORT": str(port), **(env or {})}, ready=ready), port)


def identity_model(datatype: str) -> object:
    """id_<T>: one input x [batch, 3] of datatype T, y = Identity(x)."""
    elem = V2_TYPES[datatype].onnx
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", elem, ["batch", 3])],
        [helper.make_tensor_value_info("y", elem, ["batch", 3])],
    )


def build_grpc_repository(root: Path) -> Path:
    """The service tests' repository plus one single-input Identity model per V2 datatype."""
    build_repository(root)
    for datatype in V2_TYPES:
        save(identity_model(datatype), root, f"id_{datatype}", config='{"max_batch_size": 4}')  # type: ignore[arg-type]
    return root
