"""The server runs on uvloop and httptools where they are installed (dependencies wherever wheels exist), says
so at start-up and in the ``bnfold_server_info`` metric, and reports the fallbacks honestly without them."""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.support.servers import Server, start

ROOT = Path(__file__).resolve().parents[2]


def reported(server: Server) -> tuple[str, str]:
    with server.client() as http:
        text = http.get("/metrics").text
    (labels,) = re.findall(r"^bnfold_server_info\{(.*)\} 1\.0$", text, re.M)
    found = dict(re.findall(r'(\w+)="(\w+)"', labels))
    loop, http_parser = found["loop"], found["http"]
    assert f"event loop {loop}, HTTP parser {http_parser}" in server.output()
    return loop, http_parser


def test_uvloop_and_httptools_are_dependencies_installed_here() -> None:
    """Declared in pyproject.toml with markers, and installed wherever the markers hold (as where this test runs)."""
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    by_name = {r.name: r for r in deps}
    assert {"uvloop", "httptools"} <= set(by_name)
    for name in ("uvloop", "httptools"):
        marker = by_name[name].marker
        if marker is None or marker.evaluate():
            assert importlib.util.find_spec(name) is not None, f"{name} is a dependency here but not installed"


@pytest.mark.slow  # the start-up log line is checked: a subprocess
def test_the_server_reports_uvloop_and_httptools_when_installed(process_server: Server) -> None:
    expected_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    expected_http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    assert reported(process_server) == (expected_loop, expected_http)


@pytest.mark.slow
def test_without_them_the_server_reports_the_fallbacks(repo: Path, tmp_path: Path) -> None:
    """Modules that refuse to import shadow uvloop and httptools: uvicorn falls back, and the server says so."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("uvloop", "httptools"):
        (blocked / f"{name}.py").write_text("raise ImportError('blocked by the test')\n")
    path = os.pathsep.join(p for p in (str(blocked), os.environ.get("PYTHONPATH", "")) if p)
    srv = start(tmp_path, "--model-repository", str(repo), env={"PYTHONPATH": path})
    try:
        assert reported(srv) == ("asyncio", "h11")
    finally:
        assert srv.stop() == 0, srv.output()[-2000:]
