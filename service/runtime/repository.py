"""The model repository, in Triton's layout: ``DIR/<name>/<version>/model.onnx`` and ``DIR/<name>/config.json``.

Requests only ever look names up in memory: a model name or version from a URL never reaches the file
system, so it cannot escape the repository. Loaded versions are immutable; loading a new or replaced version
builds it completely (fold, session, warm-up) before it is published (one assignment of the serving table that
requests read), so no request ever sees a half-loaded model. A file being written is loaded only once its size
and mtime stop changing.

One change to a model at a time (:meth:`Repository.turn`): a rescan's load, and the repository API's loads and
unloads (:mod:`service.runtime.control`), wait for the one under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.errors import ModelLoadError, NotFound, Unavailable, shown
from service.runtime.loading import ProviderError, load_model
from service.runtime.model import LoadedModel
from service.runtime.model_config import ModelConfig
from service.settings import Settings

log = logging.getLogger("bnfold.service")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
MODEL_FILE = "model.onnx"

Signature = tuple[int, int]  # (mtime_ns, size)


@dataclass
class ModelState:
    """One model name: its served versions, and the versions that failed to load (with why)."""

    name: str
    ready: dict[int, LoadedModel] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    signatures: dict[int, Signature] = field(default_factory=dict)
    activity: str | None = None  # "LOADING" or "UNLOADING" while the repository API changes it
    unloaded: bool = False  # by the repository API: polling leaves it alone until it is loaded again

    def versions(self) -> list[str]:
        return [str(v) for v in sorted(self.ready)]


def discover(root: Path) -> dict[str, dict[int, Path]]:
    """``{name: {version: path}}`` for every ``<name>/<version>/model.onnx`` under ``root``."""
    found: dict[str, dict[int, Path]] = {}
    if not root.is_dir():
        return found
    for model_dir in sorted(root.iterdir()):
        if not model_dir.is_dir() or not NAME.match(model_dir.name):
            continue
        for version_dir in model_dir.iterdir():
            path = version_dir / MODEL_FILE
            version = version_number(version_dir.name)
            if version is not None and path.is_file():
                found.setdefault(model_dir.name, {})[version] = path
    return found


def single_model_file(path: Path) -> Path:
    """The ONNX file a single-model path names: the path itself, or the one ``.onnx`` file under a directory.

    KServe's storage initializer copies a ``storageUri`` into ``/mnt/models``: a file lands as
    ``/mnt/models/<file>``, a folder's contents below it. Hidden entries are skipped (a ConfigMap volume holds
    ``..data/`` and timestamped folders besides its links); more than one ``.onnx`` file is an error, not a guess.
    """
    if path.is_file():
        return path
    if not path.is_dir():
        raise ModelLoadError(f"{path}: no such model file or directory")
    found = sorted(p for p in _visible_files(path) if p.suffix == ".onnx")
    if len(found) != 1:
        listed = ", ".join(str(p.relative_to(path)) for p in found[:5])
        raise ModelLoadError(
            f"{path}: a single model directory must hold exactly one .onnx file, found {len(found)}"
            + (f" ({listed})" if found else "")
            + "; give the file, or a repository with --model-repository"
        )
    return found[0]


def _visible_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():  # a linked folder could loop
            files.extend(_visible_files(entry))
        elif entry.is_file():
            files.append(entry)
    return files


def version_number(text: str) -> int | None:
    """A version is a positive decimal integer in ASCII ('²' is a digit to str.isdigit, not to int)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 18 or int(text) == 0:
        return None
    return int(text)


def signature(path: Path) -> Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


class Repository:
    def __init__(self, settings: Settings, on_change: Callable[[LoadedModel, bool], None] | None = None) -> None:
        self.settings = settings
        self.models: dict[str, ModelState] = {}
        #: what serves now, as a request names it: (name, version) and (name, None) for the latest version; the
        #: dataplane reads it, and calls :meth:`get` (which finds any other spelling of a version, or says why
        #: not) only when it misses. Rebuilt and assigned at once whenever a version is published or withdrawn.
        self.serving: dict[tuple[str, str | None], LoadedModel] = {}
        self._pending: dict[tuple[str, int], Signature] = {}  # changed files seen once, waiting to settle
        self._on_change = on_change or (lambda model, ready: None)
        self._turns: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ lookup
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        state = self.models.get(name)
        if state is None:
            raise NotFound(f"unknown model {shown(name)}")
        if version is None:
            if not state.ready:
                raise Unavailable(f"model '{name}' is not ready: {self._why(state)}")
            return state.ready[max(state.ready)]
        v = version_number(version)
        if v is None:
            raise NotFound(f"unknown version {shown(version)} of model '{name}'")
        if v in state.ready:
            return state.ready[v]
        if v in state.failed:
            raise Unavailable(f"model '{name}' version {v} is not ready: {state.failed[v]}")
        raise NotFound(f"unknown version '{version}' of model '{name}'")

    def _publish(self) -> None:
        serving: dict[tuple[str, str | None], LoadedModel] = {}
        for name, state in self.models.items():
            for version, model in state.ready.items():
                serving[(name, str(version))] = model
            if state.ready:
                serving[(name, None)] = state.ready[max(state.ready)]
        self.serving = serving

    @staticmethod
    def _why(state: ModelState) -> str:
        if state.activity is not None:
            return state.activity.lower()
        return "; ".join(state.failed.values()) or ("unloaded" if state.unloaded else "no version loaded")

    def state(self, name: str) -> ModelState:
        """The model's state, made (with nothing loaded) on first use."""
        return self.models.setdefault(name, ModelState(name))

    @contextlib.asynccontextmanager
    async def turn(self, name: str) -> AsyncIterator[None]:
        """Hold the model ``name`` for one change (load, unload, rescan), after the changes asked for before."""
        lock = self._turns.setdefault(name, asyncio.Lock())
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            await lock.acquire()
        finally:
            self._waiting[name] -= 1
        try:
            yield
        finally:
            lock.release()

    def waiting(self, name: str) -> int:
        """Changes of ``name`` waiting for their turn (not counting the one under way)."""
        return self._waiting.get(name, 0)

    def ready_count(self) -> int:
        return sum(len(s.ready) for s in self.models.values())

    # ------------------------------------------------------------------------------------------ loading
    def sources(self) -> dict[str, dict[int, Path]]:
        if self.settings.model is not None:
            try:
                path = single_model_file(self.settings.model)
            except ModelLoadError:
                return {}  # gone since start-up: a rescan unloads it
            name = self.settings.model_name or re.sub(r"[^A-Za-z0-9_.\-]", "_", path.stem) or "model"
            return {name: {1: path}}
        return discover(self.settings.model_repository)

    async def load_all(self) -> None:
        """Load every version found (at start-up; explicit model control: of the models it names); failures
        leave that version not ready."""
        if self.settings.model is not None:
            single_model_file(self.settings.model)  # raises with the reason
        if self.settings.model is None and not self.settings.model_repository.is_dir():
            raise ModelLoadError(f"{self.settings.model_repository}: model repository not found")
        found = self.sources()
        names = set(found)
        if self.settings.model_control_mode == "explicit" and "*" not in self.settings.load_models:
            names = set(self.settings.load_models)
            missing = sorted(names - set(found))
            if missing:
                raise ModelLoadError(f"BNFOLD_LOAD_MODELS names {', '.join(missing)}: not in the repository")
        for name, versions in found.items():
            if name in names:
                for version, path in sorted(versions.items()):
                    await self._load(name, version, path, signature(path))

    async def rescan(self) -> None:
        """Load added or replaced versions (once their files settle) and drop removed ones."""
        found = self.sources()
        for name, versions in found.items():
            state = self.models.get(name)
            if state is not None and (state.unloaded or state.activity is not None):
                continue  # the repository API's: unloaded, or being changed
            for version, path in sorted(versions.items()):
                sig = signature(path)
                if sig is None or (state is not None and state.signatures.get(version) == sig):
                    continue
                key = (name, version)
                if self._pending.get(key) != sig:  # first sight of this content: wait one more scan
                    self._pending[key] = sig
                    continue
                del self._pending[key]
                async with self.turn(name):
                    await self._load(name, version, path, sig)
        for name, state in list(self.models.items()):
            if state.activity is not None:
                continue
            for version in list(state.ready) + list(state.failed):
                if version not in found.get(name, {}):
                    self._unload(state, version)

    async def _load(self, name: str, version: int, path: Path, sig: Signature | None) -> str | None:
        """Load one version and publish it; None, or why it failed (the version serving before still serves)."""
        state = self.models.get(name) or ModelState(name)
        loop = asyncio.get_running_loop()
        try:
            config = ModelConfig.read(path.parent.parent / "config.json")
            model = await loop.run_in_executor(None, load_model, name, str(version), path, config, self.settings)
        except ProviderError:
            raise
        except ModelLoadError as exc:
            log.error("model %s version %s is not ready: %s", name, version, exc)
            state.failed[version] = str(exc)
            if sig is not None:
                state.signatures[version] = sig
            self.models[name] = state
            return str(exc)
        replaced = version in state.ready
        state.ready[version] = model  # published with the serving table below, before any request can run
        state.failed.pop(version, None)
        if sig is not None:
            state.signatures[version] = sig
        self.models[name] = state
        self._publish()
        self._on_change(model, True)
        log.info(
            "model %s version %s %s in %.2f s (providers %s)",
            name,
            version,
            "replaced" if replaced else "ready",
            model.load_seconds,
            ",".join(model.providers),
        )
        return None

    async def load(self, name: str, version: int, path: Path) -> str | None:
        """Load one version as at start-up (fold, verify, warm up), for the repository API: None, or why not; a
        provider missing under the ``strict`` policy fails this load rather than the server."""
        try:
            return await self._load(name, version, path, signature(path))
        except ProviderError as exc:
            return str(exc)

    def unpublish(self, state: ModelState, version: int) -> LoadedModel | None:
        """Take one version out of service (requests already admitted keep their reference); the model it was."""
        model = state.ready.pop(version, None)
        state.failed.pop(version, None)
        state.signatures.pop(version, None)
        if model is not None:
            self._publish()
            self._on_change(model, False)
        return model

    def _unload(self, state: ModelState, version: int) -> None:
        if self.unpublish(state, version) is not None:
            log.info("model %s version %s removed", state.name, version)
