"""NVIDIA Triton Inference Server as a benchmark peer, on CPU, from the ``nvidia-pytriton`` wheel.

The wheel ships a real ``tritonserver`` binary (C++ HTTP and gRPC front ends) and its python backend. Each model
here is a python-backend model whose ``model.py`` opens the same ONNX file in ONNX Runtime (one intra-op thread
unless told otherwise) and runs it per request: the front-end cost is Triton's, the compute is the same ORT call
bnfold makes. (The wheel has no ONNX Runtime backend; this is the fair stand-in for it.)

Setup, once (its own virtualenv: pytriton pins its own grpcio/protobuf)::

    python3 -m venv /work/venvs/triton
    /work/venvs/triton/bin/pip install nvidia-pytriton onnxruntime

Then ``--triton-python /work/venvs/triton/bin/python`` (or ``BNFOLD_TRITON_PYTHON``) in benchmarks/grpc.py, or by
hand: ``python -m benchmarks.triton_peer --triton-python VENV/bin/python --model tiny=PATH/model.onnx``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MODEL_PY = """
import json
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config["parameters"]["intra_op_threads"]["string_value"])
        options.inter_op_num_threads = 1
        path = args["model_repository"] + "/" + args["model_version"] + "/model.onnx"
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            results = self.session.run(self.outputs, feeds)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(r)) for name, r in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
"""

TRITON_DTYPE = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def _locate(python: str) -> dict[str, str]:
    """Where the peer virtualenv keeps pytriton's tritonserver tree, its libraries and site-packages."""
    code = (
        "import json, sys, site, pathlib, pytriton; root = pathlib.Path(pytriton.__file__).parent;"
        "print(json.dumps({'dist': str(root / 'tritonserver'), 'libs': str(root.parent / 'nvidia_pytriton.libs'),"
        "'site': site.getsitepackages()[0], 'bin': str(pathlib.Path(sys.executable).parent),"
        "'version': f'{sys.version_info[0]}.{sys.version_info[1]}',"
        "'pytriton': __import__('importlib.metadata').metadata.version('nvidia-pytriton')}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    located: dict[str, str] = json.loads(out.stdout)
    return located


def write_model(repo: Path, name: str, onnx_path: Path, intra_op_threads: int) -> None:
    """A python-backend model running ``onnx_path`` in ONNX Runtime, its config read from the ONNX file."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def tensors(values: Sequence[onnx.ValueInfoProto], kind: str) -> str:
        rows = []
        for v in values:
            elem = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
            rows.append(f'{kind} {{ name: "{v.name}" data_type: {TRITON_DTYPE[elem]} dims: {dims} }}')
        return "\n".join(rows)

    inits = {i.name for i in model.graph.initializer}
    config = "\n".join(
        [
            f'name: "{name}"',
            'backend: "python"',
            "max_batch_size: 0",
            tensors([i for i in model.graph.input if i.name not in inits], "input"),
            tensors(model.graph.output, "output"),
            "instance_group [{ kind: KIND_CPU count: 1 }]",
            f'parameters {{ key: "intra_op_threads" value: {{ string_value: "{intra_op_threads}" }} }}',
        ]
    )
    (repo / name / "1").mkdir(parents=True)
    shutil.copy(onnx_path, repo / name / "1" / "model.onnx")
    (repo / name / "1" / "model.py").write_text(MODEL_PY)
    (repo / name / "config.pbtxt").write_text(config + "\n")


@dataclass
class TritonPeer:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    workdir: Path
    version: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start(
    python: str,
    models: Mapping[str, Path],
    *,
    cpus: Collection[int] | None = None,
    intra_op_threads: int = 1,
    ports: tuple[int, int, int] | None = None,
    log: Path | None = None,
    timeout: float = 120,
) -> TritonPeer:
    """tritonserver serving ``models`` (name -> ONNX file) over HTTP and gRPC on 127.0.0.1, ready when it returns."""
    from benchmarks._harness import pinned
    from service.launcher import free_port

    where = _locate(python)
    workdir = Path(tempfile.mkdtemp(prefix="triton-peer-"))
    server = workdir / "tritonserver"
    shutil.copytree(where["dist"], server, ignore=shutil.ignore_patterns("python_backend_stubs"))
    stub = Path(where["dist"]) / "python_backend_stubs" / where["version"] / "triton_python_backend_stub"
    shutil.copy(stub, server / "backends" / "python" / "triton_python_backend_stub")
    repo = workdir / "models"
    for name, path in models.items():
        write_model(repo, name, path, intra_op_threads)
    http_port, grpc_port, metrics_port = ports or (free_port(), free_port(), free_port())
    cmd = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={server / 'backends'}",
        f"--cache-directory={server / 'caches'}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        "--allow-metrics=false",
        "--log-verbose=0",
        "--exit-on-error=true",
        "--strict-readiness=true",
    ]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (where["libs"], env.get("LD_LIBRARY_PATH")) if p)
    env["PATH"] = f"{where['bin']}:{env['PATH']}"
    env["PYTHONPATH"] = where["site"]  # the python backend's stub embeds libpython; give it the peer's packages
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    process = subprocess.Popen(pinned(cmd, cpus), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peer = TritonPeer(process, http_port, grpc_port, workdir, where["pytriton"])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            peer.stop()
            raise RuntimeError(f"tritonserver exited with {process.returncode} (log: {log})")
        try:
            with urllib.request.urlopen(f"{peer.url}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return peer
        except OSError:
            pass
        time.sleep(0.25)
    peer.stop()
    raise RuntimeError(f"tritonserver not ready in {timeout:.0f} s (log: {log})")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.triton_peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--triton-python", default=os.environ.get("BNFOLD_TRITON_PYTHON", sys.executable))
    p.add_argument("--model", action="append", required=True, help="NAME=PATH/model.onnx (repeatable)")
    args = p.parse_args(argv)
    models = {n: Path(f) for n, _, f in (m.partition("=") for m in args.model)}
    peer = start(args.triton_python, models)
    print(f"tritonserver {peer.version}: HTTP {peer.url}, gRPC 127.0.0.1:{peer.grpc_port} (Ctrl-C stops it)")
    try:
        peer.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
