from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.servers import Server, build_repository, start


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with default settings on the test repository, shared by the read-only tests."""
    srv = start(tmp_path_factory.mktemp("logs"), "--model-repository", str(repo))
    yield srv
    assert srv.stop() == 0, srv.output()[-2000:]
