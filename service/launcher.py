"""Run a bnfold server from Python and wait until it answers: for your own tests and scripts, and for ours.

Two ways, both context managers that start the server, wait until it is ready, yield it, and stop it:

- :func:`serving` runs ``bnfold serve`` (or any other HTTP server command) as a subprocess on a free port of
  127.0.0.1, its output in a log file; on failure the exception carries the log's last lines. Use it where the
  process matters: signals, exit codes, memory, worker processes.
- :func:`in_thread` runs :func:`service.server.create_app` under uvicorn in a thread of this process: no process
  start-up, the app object at hand (``server.app``). Use it for protocol and error checks.

::

    from service.launcher import serving

    with serving(["--model-repository", "models"]) as server:
        httpx.post(f"{server.url}/v2/models/digits/infer", json=...)

:func:`launch` and :meth:`ServerProcess.stop` are the same steps without the ``with``.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = [
    "LaunchError",
    "bnfold_command",
    "ServerProcess",
    "ThreadServer",
    "free_port",
    "in_thread",
    "launch",
    "serving",
]

READY = ("/v2/health/ready",)
LIVE = ("/v2/health/live",)
#: ``python -m service serve``: the ``bnfold serve`` command of the Python running this.
SERVE = (sys.executable, "-m", "service", "serve")


def bnfold_command() -> list[str] | None:
    """The installed ``bnfold`` command (beside this interpreter, on PATH, or ``python -m service``) if
    ``bnfold serve --help`` works with it, else None: what an example or script outside the package runs."""
    beside = Path(sys.executable).with_name("bnfold")
    candidates = [[str(beside)]] if beside.exists() else []
    if shutil.which("bnfold"):
        candidates.append(["bnfold"])
    candidates.append([sys.executable, "-m", "service"])
    for command in candidates:
        try:
            done = subprocess.run([*command, "serve", "--help"], capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return command
    return None


class LaunchError(RuntimeError):
    """The server exited, or did not become ready in time; the message ends with its log's last lines."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def status(host: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of ``GET path``, or None when nothing answers."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@dataclass
class ServerProcess:
    """A server subprocess listening on ``host:port``, its stdout and stderr in ``log``."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    host: str = "127.0.0.1"
    name: str = "bnfold"
    own_session: bool = False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def output(self) -> str:
        """Everything the server wrote so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_ready(self, paths: Sequence[str] = READY, timeout: float = 120) -> float:
        """Wait until every path answers 200; the seconds it took. LaunchError if the process exits first."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise LaunchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if all(status(self.host, self.port, p) == 200 for p in paths):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise LaunchError(f"{self.name} not ready in {timeout:g} s ({', '.join(paths)}):\n{self.tail()}")
            time.sleep(0.05)

    def send(self, sig: int) -> None:
        """Send ``sig`` to the server (to its whole process group when it has its own session)."""
        with contextlib.suppress(ProcessLookupError):
            if self.own_session:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send ``sig`` and wait; the exit code, or None when it had to be killed after ``timeout`` s."""
        if self.proc.poll() is None:
            self.send(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            self.proc.wait(30)
            return None


def launch(
    args: Sequence[str] = (),
    *,
    command: Sequence[str] = SERVE,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
    cpus: Collection[int] | None = None,
    ready: Sequence[str] = READY,
    timeout: float = 120,
    name: str = "bnfold",
    own_session: bool = False,
    grpc_port: int = 0,
    keep_log: bool = False,
) -> ServerProcess:
    """Start ``command ARGS`` and wait until every ``ready`` path answers 200 (none: do not wait).

    With the default command (``bnfold serve``), ``--port`` is added: ``port``, or a free one; and
    ``--grpc-port``: ``grpc_port``, 0 (no gRPC) by default, since 8001 would be shared by every server started
    this way (unless ARGS or the environment name a gRPC port). With another command, pass the ``port`` it
    listens on. ``env`` is the whole environment (default: this process's); ``cpus`` pins the server with
    ``taskset``; ``own_session`` starts it in a new session, so that
    :meth:`ServerProcess.stop` signals the server and every worker process it forks. Without ``log``, the server
    writes to a temporary ``bnfold-server-*`` folder, removed when this Python process exits unless ``keep_log``.
    """
    if port is None:
        port = free_port()
    argv = [*command, *args]
    if tuple(command) == SERVE:
        argv += ["--port", str(port)]
        if "--grpc-port" not in argv and "BNFOLD_GRPC_PORT" not in (os.environ if env is None else env):
            argv += ["--grpc-port", str(grpc_port)]
    if cpus:
        argv = ["taskset", "-c", ",".join(str(c) for c in sorted(cpus)), *argv]
    if log is None:
        folder = Path(tempfile.mkdtemp(prefix="bnfold-server-"))
        if not keep_log:
            _remove_at_exit(folder)
        log = folder / f"{name}-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env) if env is not None else None, cwd=cwd,
            start_new_session=own_session,
        )  # fmt: skip
    server = ServerProcess(proc, port, log, name=name, own_session=own_session)
    if ready:
        try:
            server.wait_ready(ready, timeout)
        except BaseException:
            server.stop(signal.SIGKILL)
            raise
    return server


_SCRATCH: list[Path] = []


def _remove_at_exit(folder: Path) -> None:
    """Remove ``folder`` when this process exits (its server's log stays readable until then, after a stop too)."""
    if not _SCRATCH:
        atexit.register(_remove_scratch)
    _SCRATCH.append(folder)


def _remove_scratch() -> None:
    for folder in _SCRATCH:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def serving(args: Sequence[str] = (), **kwargs: Any) -> Iterator[ServerProcess]:
    """:func:`launch`, yield the server, stop it (SIGTERM, then SIGKILL after 30 s).

    An exception raised inside the ``with`` gets the server's last log lines attached as a note.
    """
    server = launch(args, **kwargs)
    try:
        yield server
    except BaseException as exc:
        exc.add_note(f"---- last lines of {server.name}'s log ({server.log}):\n{server.tail()}")
        raise
    finally:
        server.stop()


@dataclass
class ThreadServer:
    """An app served by uvicorn in a thread of this process (see :func:`in_thread`)."""

    app: Any  # the ASGI app from create_app; ``app.app.state.dataplane`` holds the models
    port: int
    host: str = "127.0.0.1"
    log: list[str] = field(default_factory=list)  # the server's log lines, tracebacks included

    def output(self) -> str:
        """Everything logged so far on the ``bnfold`` and ``uvicorn`` loggers, INFO and above. They are process-wide:
        lines of another in-thread server running at the same time show here too."""
        return "\n".join(self.log)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def _captured(lines: list[str], names: Sequence[str] = ("bnfold", "uvicorn")) -> Iterator[None]:
    """The named loggers at INFO, their records also kept in ``lines``; levels restored afterwards."""
    handler = _Lines(lines)
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


@contextlib.contextmanager
def in_thread(settings: Settings | None = None, timeout: float = 120) -> Iterator[ThreadServer]:
    """Serve ``create_app(settings)`` with uvicorn in a thread, on a free port of 127.0.0.1 (``settings.port``
    is ignored; gRPC runs only when ``settings`` sets ``grpc_port`` explicitly); yields once the lifespan has
    started, i.e. once the models are loaded. uvicorn leaves this
    process's logging configuration alone; the server's log lines are kept (:meth:`ThreadServer.output`)."""
    lines: list[str] = []
    with _captured(lines), _serve_in_thread(settings, timeout) as (app, port):
        yield ThreadServer(app, port, log=lines)


@contextlib.contextmanager
def _serve_in_thread(settings: Settings | None, timeout: float) -> Iterator[tuple[Any, int]]:
    import uvicorn  # noqa: PLC0415  (the launcher itself needs no web stack)

    from service import connections  # noqa: PLC0415
    from service.server import create_app  # noqa: PLC0415
    from service.settings import Settings  # noqa: PLC0415

    settings = settings or Settings()
    if "grpc_port" not in settings.model_fields_set:
        settings = settings.model_copy(update={"grpc_port": 0})
    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed to uvicorn: no race for the port
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        http=connections.protocol(),
        timeout_keep_alive=settings.idle_timeout_seconds,  # type: ignore[arg-type]  # a float works
    )
    server = uvicorn.Server(config)
    exit_codes: list[object] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn's answer to a failed lifespan start-up
            exit_codes.append(exc.code)

    thread = threading.Thread(target=run, name="bnfold-in-thread", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                code = f" (exit code {exit_codes[0]})" if exit_codes else ""
                raise LaunchError(f"the in-thread server stopped during start-up{code}; its log says why")
            if time.monotonic() > deadline:
                raise LaunchError(f"the in-thread server did not start in {timeout:g} s")
            time.sleep(0.01)
        yield app, int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
