"""`bnfold --version`; `bnfold serve` refusing, in one line, ports another server holds."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import cli
from service.launcher import free_port

PYPROJECT_VERSION = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["version"]


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"bnfold {PYPROJECT_VERSION}\n"


def test_version_without_installed_metadata_reads_pyproject(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.version() == PYPROJECT_VERSION
    monkeypatch.setattr(cli, "__file__", "/nowhere/service/cli.py")
    assert cli.version() == "unknown"


@pytest.fixture
def taken() -> Iterator[list[int]]:
    """Two ports another server listens on (this test holds them)."""
    held = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    yield [s.getsockname()[1] for s in held]
    for s in held:
        s.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("BNFOLD_")]:
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_env")
def test_a_taken_grpc_port_is_one_line_and_exit_3_before_loading(
    taken: list[int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Both ports held: the gRPC one is named (were it not checked, uvicorn's own bind error would be many lines)."""
    http, grpc = taken
    assert cli.main(["serve", "--port", str(http), "--grpc-port", str(grpc)]) == cli.STARTUP_FAILED == 3
    err = capsys.readouterr().err
    assert err == (
        f"bnfold: error: gRPC cannot listen on 127.0.0.1:{grpc} (address already in use): "
        "choose another port with --grpc-port (0 turns gRPC off)\n"
    )


@pytest.mark.usefixtures("clean_env")
def test_a_taken_http_port_is_one_line_and_exit_3(taken: list[int], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--port", str(taken[0]), "--grpc-port", "0"]) == 3
    assert capsys.readouterr().err == (
        f"bnfold: error: HTTP cannot listen on 127.0.0.1:{taken[0]} (address already in use): "
        "choose another port with --port\n"
    )
    assert cli.main(["serve", "--port", str(taken[0]), "--grpc-port", str(taken[0])]) == 3
    assert "cannot share port" in capsys.readouterr().err


def test_free_ports_pass_the_check() -> None:
    from service.settings import Settings

    assert cli.taken_port(Settings(port=free_port(), grpc_port=free_port())) is None
    assert cli.taken_port(Settings(port=0, grpc_port=0)) is None
