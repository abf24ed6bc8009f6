"""What the HTTP benchmarks share: CPU pinning, servers (through :mod:`service.launcher`), wrk and its Lua
scripts, the server's CPU time and memory, package versions.

wrk runs as a subprocess with a Lua script that prints one ``MARKER {json}`` line from its ``done`` callback;
:func:`run_wrk` returns that JSON. Only the counting script defines ``response()``: wrk then parses every
answer's headers and body for Lua, which costs client time, so the fixed-body script (throughput and
latency figures) does without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

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
