"""`bnfold --version`: the package's version, installed or run from a clone."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from service import cli

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
