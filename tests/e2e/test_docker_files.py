"""The container files, checked without Docker: every BNFOLD_ variable they set is a real setting (the settings
ignore unknown names, so a typo or a rename would pass silently), and the scripts parse. The image itself is built
and run for real by scripts/docker-smoke, which .ci/run runs after the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _names(pattern: str, text: str) -> set[str]:
    return set(re.findall(pattern, text, re.M))


def test_dockerfile_and_compose_set_only_real_settings() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    compose = (ROOT / "docker-compose.yml").read_text()
    in_image = _names(r"\b(BNFOLD_[A-Z_]+)=", dockerfile)
    in_compose = _names(r"^\s+(BNFOLD_[A-Z_]+):", compose)
    assert {"BNFOLD_HOST", "BNFOLD_PORT", "BNFOLD_PROVIDERS"} <= in_image
    assert {"BNFOLD_HOST", "BNFOLD_PORT", "BNFOLD_PROVIDERS", "BNFOLD_GRACEFUL_SHUTDOWN_SECONDS"} <= in_compose
    fields = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
    assert in_image - fields == set()
    assert in_compose - fields == set()


def test_entrypoint_reads_only_real_settings() -> None:
    script = (ROOT / "scripts" / "docker-entrypoint").read_text()
    fields = {f"BNFOLD_{name.upper()}" for name in Settings.model_fields}
    used = _names(r"\$\{?(BNFOLD_[A-Z_]+)", script)
    assert used and used - fields == set()


def test_compose_grace_period_outlasts_the_drain() -> None:
    """docker stop sends SIGKILL after stop_grace_period: it must be longer than the service's own drain time."""
    compose = (ROOT / "docker-compose.yml").read_text()
    (grace,) = _names(r"^\s+stop_grace_period:\s*(\d+)s\s*$", compose)
    drains = _names(r"BNFOLD_GRACEFUL_SHUTDOWN_SECONDS:\s*\"?(\d+)", compose)
    assert drains and all(int(grace) > int(d) for d in drains)


@pytest.mark.parametrize(("shell", "script"), [("bash", "docker-smoke"), ("sh", "docker-entrypoint")])
def test_scripts_parse(shell: str, script: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"no {shell}")
    path = ROOT / "scripts" / script
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    assert subprocess.run([shell, "-n", str(path)], check=False).returncode == 0
