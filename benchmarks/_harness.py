"""What the HTTP benchmarks share: the benchmark models and their request bodies (:class:`Bench`), CPU pinning,
servers (through :mod:`service.launcher`), one checked request, wrk and its Lua scripts, the server's CPU time
and memory, package versions, and the service's request path without HTTP (:func:`rest_request_path`).

wrk runs as a subprocess with a Lua script that prints one ``MARKER {json}`` line from its ``done`` callback;
:func:`run_wrk` returns that JSON. Only the counting script defines ``response()``: wrk then parses every
answer's headers and body for Lua, which costs client time, so the fixed-body script (throughput and
latency figures) does without it.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import build_conv224, build_tiny
from service.launcher import READY, SERVE, ServerProcess, launch

ROOT = Path(__file__).resolve().parent.parent

#: POST one fixed body read from a file; args: BODY_FILE HEADER_LENGTH|- CONTENT_TYPE. Prints BENCH_JSON.
FIXED_BODY_LUA = r"""
-- POST one fixed body read from a file; args: BODY_FILE HEADER_LENGTH|- CONTENT_TYPE
function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[3]
  if args[2] ~= "-" then
    wrk.headers["Inference-Header-Content-Length"] = args[2]
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "mean_us": %.1f, ' ..
    '"min_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.min, latency.max))
end
"""

#: POST one fixed JSON body; count every status; print LIMIT_REACHED after LIMIT answers. args: BODY_FILE LIMIT.
#: Prints LOAD_JSON.
COUNTING_LUA = r"""
-- POST one fixed body; count every status; stop after LIMIT answers.  args: BODY_FILE LIMIT
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  limit = tonumber(args[2])
  answered = 0
  codes = {}
end

function response(status, headers, body)
  answered = answered + 1
  codes[status] = (codes[status] or 0) + 1
  if answered == limit then
    io.write("LIMIT_REACHED\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local merged = {}
  local total = 0
  for _, t in ipairs(threads) do
    total = total + t:get("answered")
    for status, n in pairs(t:get("codes")) do
      merged[status] = (merged[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    table.insert(parts, string.format('"%d": %d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    'LOAD_JSON {"answered": %d, "requests": %d, "duration_us": %d, "bytes": %d, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "mean_us": %.1f, "min_us": %d, "max_us": %d}\n',
    total, summary.requests, summary.duration, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.min, latency.max))
end
"""


# ------------------------------------------------------------------------------------------------ pinning
def parse_cpus(text: str) -> set[int]:
    return {int(c) for c in text.split(",") if c.strip()}


def pinned(cmd: list[str], cpus: Collection[int] | None) -> list[str]:
    """``cmd`` run on ``cpus`` only (taskset execs it: the pid stays the command's)."""
    if not cpus:
        return cmd
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *cmd]


# ------------------------------------------------------------------------------------------------ servers
def clean_env(**extra: str) -> dict[str, str]:
    """This environment without ``BNFOLD_*``/``MLSERVER_*`` variables (servers on their defaults), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BNFOLD_", "MLSERVER_"))}
    env.update(extra)
    return env


def start_server(
    tmp: Path,
    name: str,
    args: Sequence[str] = (),
    *,
    command: Sequence[str] = SERVE,
    port: int | None = None,
    cpus: Collection[int] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path = ROOT,
) -> ServerProcess:
    """Start a server (default ``bnfold serve ARGS``, default settings) in its own session, log ``tmp/NAME.log``;
    not waited for: call ``wait_ready``."""
    return launch(
        args,
        command=command,
        port=port,
        env=clean_env() if env is None else env,
        log=tmp / f"{name}.log",
        cwd=cwd,
        cpus=cpus,
        ready=(),
        name=name,
        own_session=True,
    )


def model_ready_paths(models: Sequence[str]) -> list[str]:
    return [*READY, *(f"/v2/models/{m}/ready" for m in models)]


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc); None elsewhere."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (10^6 bytes), from /proc/<pid>/status."""
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"no VmRSS for pid {pid}")
    return int(match.group(1)) * 1024 / 1e6


# ------------------------------------------------------------------------------------------------ wrk
def run_wrk(
    script: Path,
    url: str,
    script_args: Sequence[str],
    *,
    connections: int,
    seconds: float,
    cpus: Collection[int] | None,
    marker: str,
    stop_marker: str | None = None,
    latency: bool = False,
) -> dict[str, Any]:
    """One wrk run (one thread, ``connections`` keep-alive connections, ``-d seconds``): the script's ``marker``
    JSON. When the script prints ``stop_marker``, wrk gets SIGINT, so its summary (and duration) ends there;
    ``limit_reached_after_s`` says when that was (None if never)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "30s"]
    cmd += [*(["--latency"] if latency else []), "-s", str(script), url, "--", *script_args]
    start = time.monotonic()
    proc = subprocess.Popen(pinned(cmd, cpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    lines, reached = [], None
    try:
        for ln in proc.stdout:
            lines.append(ln)
            if stop_marker and ln.startswith(stop_marker) and reached is None:
                reached = time.monotonic() - start
                proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    line = next((ln for ln in lines if ln.startswith(marker + " ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk failed ({code}):\n{''.join(lines)[-2000:]}\n{err[-2000:]}")
    result: dict[str, Any] = json.loads(line.removeprefix(marker + " "))
    if stop_marker:
        result["limit_reached_after_s"] = reached
    return result


def wrk_version() -> str | None:
    """wrk's version line without its copyright, e.g. ``wrk 4.1.0 [epoll]``."""
    try:
        wrk = subprocess.run(["wrk", "-v"], check=False, capture_output=True, text=True, timeout=10)
        return (wrk.stdout + wrk.stderr).splitlines()[0].split(" Copyright")[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------------------------------------------ versions
def package_versions(names: Sequence[str], missing: str | None = None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = missing
    return out


# ------------------------------------------------------------------------------------------------ models
def build_resnet10() -> Any:
    from converter import zoo

    return zoo.resnet(blocks=(1, 1, 1, 1), classes=1000)


IMAGE_MODELS: dict[str, tuple[Callable[[], Any], str]] = {
    "conv224": (
        build_conv224,
        "1×3×224×224 FP32; 4× [Conv 3×3 s2 + BN + Relu] (3→16→32→64→128), GlobalAveragePool, Gemm 128→10",
    ),
    "resnet10": (build_resnet10, "1×3×224×224 FP32; converter.zoo.resnet(blocks=(1,1,1,1)), 1000 classes"),
}
TINY_DESCRIPTION = "1×20 FP32; Gemm 20→64 + BatchNormalization + Relu + Gemm 64→10"


@dataclass
class Bench:
    """One model as the benchmark uses it: files, request bodies, the reference output."""

    name: str
    role: str  # "tiny" or "image" (which overhead target applies)
    description: str
    input_name: str
    input: np.ndarray
    reference: np.ndarray  # in-process output of the folded model
    output_name: str
    json_body: Path
    binary_body: Path
    binary_header_length: int
    body_bytes: dict[str, int]
    nodes: dict[str, int]

    @classmethod
    def write(
        cls, name: str, role: str, description: str, folded: Any, x: np.ndarray, bodies: Path, nodes: dict[str, int]
    ) -> Bench:
        """Run ``folded`` on ``x`` in process for the reference output; write ``x`` as a JSON and as a binary V2
        request body to ``bodies``."""
        import onnxruntime as ort
        import orjson

        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(folded.SerializeToString(), so, providers=["CPUExecutionProvider"])
        input_name, output_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        reference = sess.run([output_name], {input_name: x})[0]
        tensor = {"name": input_name, "shape": list(x.shape), "datatype": "FP32"}
        # the JSON body as a V2 client sends it: float32 values written as Python floats (shortest repr)
        json_body = orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
        header = orjson.dumps(
            {
                "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
                "parameters": {"binary_data_output": True},
            }
        )
        bodies.mkdir(parents=True, exist_ok=True)
        (bodies / f"{name}.json").write_bytes(json_body)
        (bodies / f"{name}.bin").write_bytes(header + x.tobytes())
        return cls(
            name=name,
            role=role,
            description=description,
            input_name=input_name,
            input=x,
            reference=reference,
            output_name=output_name,
            json_body=bodies / f"{name}.json",
            binary_body=bodies / f"{name}.bin",
            binary_header_length=len(header),
            body_bytes={"json": len(json_body), "binary": len(header) + x.nbytes},
            nodes=nodes,
        )


def prepare_models(tmp: Path, image_model: str) -> list[Bench]:
    """bnfold repository (models with BN), MLServer repository (folded files), request bodies."""
    import onnx

    import converter

    rng = np.random.default_rng(0)
    benches = []
    specs = [("tiny", "tiny", build_tiny, TINY_DESCRIPTION), (image_model, "image", *IMAGE_MODELS[image_model])]
    for name, role, make, description in specs:
        model = make()
        folded = converter.convert(model).model
        src = tmp / "bnfold" / name / "1"
        src.mkdir(parents=True)
        onnx.save(model, str(src / "model.onnx"))
        dst = tmp / "mlserver" / name
        dst.mkdir(parents=True)
        onnx.save(folded, str(dst / "model.onnx"))
        inp = model.graph.input[0]
        x = rng.standard_normal([d.dim_value for d in inp.type.tensor_type.shape.dim]).astype(np.float32)
        nodes = {
            "original": len(model.graph.node),
            "folded": len(folded.graph.node),
            "batchnorm_after_fold": sum(n.op_type == "BatchNormalization" for n in folded.graph.node),
        }
        benches.append(Bench.write(name, role, description, folded, x, tmp / "bodies", nodes))
    return benches


def infer_url(server: ServerProcess, model: str) -> str:
    return f"{server.url}/v2/models/{model}/infer"


# ------------------------------------------------------------------------------------------------ checks
def post(url: str, body: bytes, header_length: int | None) -> tuple[int, dict[str, str], bytes]:
    host, _, rest = url.removeprefix("http://").partition("/")
    hostname, _, port = host.partition(":")
    conn = http.client.HTTPConnection(hostname, int(port), timeout=60)
    headers = {"Content-Type": "application/json" if header_length is None else "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    try:
        conn.request("POST", "/" + rest, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def decode_output(headers: dict[str, str], body: bytes, name: str) -> np.ndarray:
    length = headers.get("inference-header-content-length")
    header = json.loads(body if length is None else body[: int(length)])
    offset = 0 if length is None else int(length)
    for out in header["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if out["name"] == name:
            if size is None:
                return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
            return np.frombuffer(body[offset : offset + size], dtype=np.float32).reshape(out["shape"])
        offset += size or 0
    raise KeyError(name)


def check(server: ServerProcess, bench: Bench, encoding: str) -> float:
    """One request before the load: the answer must match the in-process output."""
    body_path = bench.json_body if encoding == "json" else bench.binary_body
    header_length = None if encoding == "json" else bench.binary_header_length
    status, headers, body = post(infer_url(server, bench.name), body_path.read_bytes(), header_length)
    if status != 200:
        raise RuntimeError(f"{server.name}/{bench.name}/{encoding}: HTTP {status}: {body[:300]!r}")
    got = decode_output(headers, body, bench.output_name)
    diff = float(np.max(np.abs(got - bench.reference)))
    scale = float(np.max(np.abs(bench.reference))) or 1.0
    if diff > 1e-4 * scale:
        raise RuntimeError(f"{server.name}/{bench.name}/{encoding}: output differs by {diff} from in-process")
    return diff


def wrk_cell(
    lua: Path,
    url: str,
    bench: Bench,
    encoding: str,
    connections: int,
    seconds: float,
    cpus: set[int] | None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """One wrk run; with ``server_pid``, also the server's CPU time per request (user + system, all threads)."""
    if encoding == "json":
        args = [str(bench.json_body), "-", "application/json"]
    else:
        args = [str(bench.binary_body), str(bench.binary_header_length), "application/octet-stream"]
    cpu_before = cpu_seconds(server_pid)
    r = run_wrk(lua, url, args, connections=connections, seconds=seconds, cpus=cpus, marker="BENCH_JSON")
    cpu_after = cpu_seconds(server_pid)
    r["errors"] = sum(r[k] for k in ("connect", "read", "write", "status", "timeout"))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    if cpu_before is not None and cpu_after is not None and r["requests"]:
        r["server_cpu_us_per_request"] = (cpu_after - cpu_before) / r["requests"] * 1e6
    return r


# ------------------------------------------------------------------------------------------------ request path
def rest_request_path(model: Any, body: bytes, header_length: int | None, max_elements: int) -> bytes:
    """What the server does per REST request minus HTTP and the event loop: decode, check against the model,
    run with RunOptions (as a request with a timeout), classify, encode."""
    from service.rest.codec import encode_result, parse_request, raw_request
    from service.runtime.work import prepare

    if header_length == 0:
        request = raw_request(model.name, model.inputs, model.max_batch_size, body, max_elements)
    else:
        request = parse_request(body, header_length, max_elements)
    work = prepare(model, request, encode_result)
    work.stoppable()
    payload, _ = work()
    return payload


# ------------------------------------------------------------------------------------------------ stack versions
def versions(mlserver_python: str | None) -> dict[str, Any]:
    stack = ["onnxruntime", "uvicorn", "uvloop", "httptools", "fastapi", "starlette", "orjson", "numpy", "onnx"]
    v: dict[str, Any] = {"bnfold_venv": package_versions(stack), "wrk": wrk_version()}
    if mlserver_python:
        code = (
            "import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            f"for n in {['mlserver', *stack]!r}:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = None\n"
            "out['python'] = sys.version.split()[0]\n"
            "print(json.dumps(out))\n"
        )
        proc = subprocess.run([mlserver_python, "-c", code], check=False, capture_output=True, text=True, timeout=60)
        v["mlserver_venv"] = json.loads(proc.stdout) if proc.returncode == 0 else None
    return v
