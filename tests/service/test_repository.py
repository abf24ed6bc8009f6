"""The repository's serving table, which the dataplane reads for every request instead of calling the lookup: it
names exactly what :meth:`Repository.get` serves, through loads, a new version, unloads and a version's removal,
and a name it misses still resolves through the lookup (another spelling of a version) or fails with its reason."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from service.errors import NotFound, Unavailable
from service.runtime import control
from service.runtime.repository import Repository
from service.settings import Settings
from tests.support.servers import save, static_model


def table(repository: Repository) -> dict[tuple[str, str | None], str]:
    return {key: f"{model.name}/{model.version}" for key, model in repository.serving.items()}


def agrees_with_lookup(repository: Repository) -> None:
    for (name, version), model in repository.serving.items():
        assert repository.get(name, version) is model


def test_the_serving_table_follows_every_change_and_a_miss_falls_back_to_the_lookup(tmp_path: Path) -> None:
    root = tmp_path / "models"
    save(static_model(), root, "scale", 1)
    save(static_model(), root, "other", 1)
    repository = Repository(Settings(model_repository=root, warmup_runs=0))

    async def main() -> None:
        await repository.load_all()
        assert table(repository) == {
            ("scale", "1"): "scale/1",
            ("scale", None): "scale/1",
            ("other", "1"): "other/1",
            ("other", None): "other/1",
        }
        agrees_with_lookup(repository)
        assert repository.get("scale", "01") is repository.serving[("scale", "1")]  # not in the table: the lookup

        save(static_model(), root, "scale", 2)  # a new version becomes the latest
        await control.load(repository, "scale")
        assert table(repository)[("scale", None)] == "scale/2" and ("scale", "1") in repository.serving
        agrees_with_lookup(repository)

        shutil.rmtree(root / "scale" / "1")  # gone from the repository: withdrawn on the next load
        await control.load(repository, "scale")
        assert ("scale", "1") not in repository.serving and table(repository)[("scale", None)] == "scale/2"

        await control.unload(repository, "scale")
        assert {name for name, _ in repository.serving} == {"other"}
        with pytest.raises(Unavailable, match="unloaded"):
            repository.get("scale")
        with pytest.raises(NotFound):
            repository.get("scale", "1")

    asyncio.run(main())
