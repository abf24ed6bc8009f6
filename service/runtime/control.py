"""The model repository API (Triton's model-repository extension, which MLServer serves too): the index of every
model with its state, load and unload, without a restart.

- ``index``: every version found in the repository or held in memory, each ``READY``, ``UNAVAILABLE`` (with
  why: the load error, ``unloaded``, ``not loaded``), ``LOADING`` or ``UNLOADING``.
- ``load``: re-read a model's versions from the repository, each folded, verified and warmed up as at start-up
  and published only once complete, so a version that fails to load leaves the one serving before in service;
  versions gone from the repository are unloaded.
- ``unload``: new requests for the model are refused at once, the admitted ones finish, then its versions go.

One change to a model at a time (:meth:`~service.runtime.repository.Repository.turn`): an unload asked for
while the model loads waits for the load, then unloads.
"""

from __future__ import annotations

import logging

from service.errors import BadRequest, NotFound, shown
from service.runtime.repository import ModelState, Repository

log = logging.getLogger("bnfold.service")

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


def index(repository: Repository, ready_only: bool = False) -> list[dict[str, str]]:
    """Triton's repository index: ``{"name", "version", "state", "reason"}`` per version, by name and version."""
    found = repository.sources()
    entries = []
    for name in sorted(set(found) | set(repository.models)):
        state = repository.models.get(name)
        versions = set(found.get(name, {}))
        if state is not None:
            versions |= set(state.ready) | set(state.failed)
        for version in sorted(versions):
            status, reason = _state(state, version)
            if status == READY or not ready_only:
                entries.append({"name": name, "version": str(version), "state": status, "reason": reason})
    return entries


def _state(state: ModelState | None, version: int) -> tuple[str, str]:
    if state is None:
        return UNAVAILABLE, "not loaded"
    if state.activity is not None:
        return state.activity, ""
    if version in state.ready:
        return READY, f"the last load failed: {state.failed[version]}" if version in state.failed else ""
    if version in state.failed:
        return UNAVAILABLE, state.failed[version]
    return UNAVAILABLE, "unloaded" if state.unloaded else "not loaded"


async def load(repository: Repository, name: str) -> None:
    """(Re)load every version of ``name`` found in the repository. :class:`NotFound` when it has none;
    :class:`BadRequest` naming each version that failed (the versions serving before keep serving)."""
    if name not in repository.sources():
        raise NotFound(f"no model {shown(name)} in the repository")
    errors: list[str] = []
    async with repository.turn(name):
        versions = repository.sources().get(name, {})  # as it is now, after any change before this one
        state = repository.state(name)
        state.activity = LOADING
        try:
            for version, path in sorted(versions.items()):
                error = await repository.load(name, version, path)
                if error is not None:
                    errors.append(f"version {version}: {error}")
            for version in sorted((set(state.ready) | set(state.failed)) - set(versions)):
                await _retire(repository, state, version, "gone from the repository")
            state.unloaded = False
        finally:
            state.activity = None
    if not versions:
        raise NotFound(f"no model '{name}' in the repository")
    if errors:
        serving = f"version(s) {', '.join(state.versions())} still serving" if state.ready else "nothing serving"
        raise BadRequest(f"failed to load model '{name}': {'; '.join(errors)} ({serving})")


async def unload(repository: Repository, name: str) -> None:
    """Unload every version of ``name``: refused to new requests at once, gone once the admitted ones finished.
    :class:`NotFound` for a model neither served nor in the repository."""
    if name not in repository.models and name not in repository.sources():
        raise NotFound(f"unknown model {shown(name)}")
    async with repository.turn(name):
        state = repository.state(name)
        state.activity = UNLOADING
        try:
            for version in sorted(set(state.ready) | set(state.failed)):
                await _retire(repository, state, version, "unloaded")
            state.unloaded = True
        finally:
            state.activity = None


async def _retire(repository: Repository, state: ModelState, version: int, why: str) -> None:
    model = repository.unpublish(state, version)
    if model is not None:
        if model.in_flight:
            log.info("model %s version %s: %d request(s) in flight to finish", state.name, version, model.in_flight)
        await model.drained()
        log.info("model %s version %s %s", state.name, version, why)
