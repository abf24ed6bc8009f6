from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.servers import Server, build_repository, start


@pytest.fixture(scope="package")
def repo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The service tests' repository (digits v1+v2, dtypes, slow, static, corrupt), default settings; shared by the
    bad-input tests, which only read."""
    repo = build_repository(tmp_path_factory.mktemp("reliability-repo"))
    srv = start(tmp_path_factory.mktemp("reliability"), "--model-repository", str(repo))
    yield srv
    assert srv.stop() == 0, srv.output()[-3000:]
