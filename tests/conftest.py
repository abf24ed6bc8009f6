"""Session-wide servers on one test repository (digits v1+v2, dtypes, slow, static, corrupt), default settings.

``server`` runs in a thread of the test process (no process start-up): for tests that only talk HTTP.
``process_server`` is a real ``bnfold serve`` subprocess: for tests that read the server's memory or its log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import InThread, Server, build_repository, in_process, start


@pytest.fixture(scope="session")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def server(repo: Path) -> Iterator[InThread]:
    """The app in a thread of the test process, shared by the read-only HTTP tests."""
    with in_process(model_repository=repo) as srv:
        yield srv


@pytest.fixture(scope="session")
def process_server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A ``bnfold serve`` subprocess on the repository, shared by the read-only tests that watch the process."""
    srv = start(tmp_path_factory.mktemp("logs"), "--model-repository", str(repo))
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]
