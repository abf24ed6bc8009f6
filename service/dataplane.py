"""The protocol-agnostic core both transports call: the API key decision, model lookup, admission, deadlines
and metrics, then the runtime on already-decoded tensors. Errors leave as :mod:`service.errors` classes (a
meaning, not a status code); a transport decodes its wire format, calls in here, and encodes.

One inference, as a transport writes it (top to bottom, nothing called back)::

    with dataplane.admit(name, version, credentials, transport) as admitted:   # auth, lookup, admission, metrics
        request = <the transport reads and decodes its request>                # its own codec
        answer = await admitted.run(request, encode, deadline)                  # validate -> compute -> outputs
                                                                               #   -> encode (compute thread)
    <the transport responds>

Admission comes before the body is read, so a flood of slow uploads is bounded by the queue too. What runs a
model's work is a :class:`~service.runtime.work.Compute`: the scheduler, or the model's batcher (made on first
use), which joins concurrent requests into one run on the scheduler's threads. The dataplane builds nothing
of its own: the server (:mod:`service.server`) hands it the repository, the scheduler and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

from service.errors import BadRequest, Busy, ClientGone, Internal, ServiceError, Unauthorized, Unavailable
from service.metrics import Bound, Metrics
from service.runtime import control, metadata
from service.runtime.batcher import Batcher
from service.runtime.model import LoadedModel
from service.runtime.repository import Repository
from service.runtime.scheduler import Scheduler
from service.runtime.work import Compute, prepare
from service.settings import Settings
from service.v2.tensors import Encoder, InferRequest

T = TypeVar("T")
log = logging.getLogger("bnfold.service")


class DataPlane:
    """Everything a transport needs; one per process, shared by REST and gRPC."""

    def __init__(self, settings: Settings, repository: Repository, scheduler: Scheduler, metrics: Metrics) -> None:
        self.settings = settings
        self.repository = repository
        self.scheduler = scheduler
        self.metrics = metrics
        # per model version; weak, so a replaced version's batcher goes with it
        self._batchers: weakref.WeakKeyDictionary[LoadedModel, Batcher] = weakref.WeakKeyDictionary()
        self.transports: list[str] = ["rest"]
        self.started = False
        self.draining = False
        self._api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    # --------------------------------------------------------------------------------------- health
    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        """Started, not draining, and serving a model (explicit model control: serving is what the API loads)."""
        serving = self.repository.ready_count() > 0 or self.settings.model_control_mode == "explicit"
        return self.started and not self.draining and serving

    def authorize(self, credentials: bytes | None) -> None:
        """Constant-time check of an ``Authorization`` value (``Bearer <key>``) when BNFOLD_API_KEY is set."""
        if self._api_key is None:
            return
        scheme, _, token = (credentials or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self._api_key):
            raise Unauthorized()

    # ------------------------------------------------------------------------------------- metadata
    def model(self, name: str, version: str | None, credentials: bytes | None) -> LoadedModel:
        self.authorize(credentials)
        return self.repository.get(name, version)

    def server_metadata(self) -> dict[str, Any]:
        return metadata.server_metadata()

    def model_metadata(self, name: str, version: str | None, credentials: bytes | None) -> dict[str, Any]:
        model = self.model(name, version, credentials)
        return metadata.model_metadata(model, self.repository.models[name].versions(), self.transports)

    def model_config(self, name: str, version: str | None, credentials: bytes | None) -> dict[str, Any]:
        return metadata.triton_config(self.model(name, version, credentials))

    def model_ready(self, name: str, version: str | None, credentials: bytes | None) -> tuple[str, str | None, bool]:
        """(name, version, ready); a known model that does not serve (yet) is not ready, an unknown one NotFound."""
        self.authorize(credentials)
        try:
            model = self.repository.get(name, version)
        except Unavailable:
            return name, version, False
        return model.name, model.version, not self.draining

    # ------------------------------------------------------------------------------------ repository
    def model_names(self, credentials: bytes | None) -> list[str]:
        """The models serving at least one version (KServe's ``GET /v2/models``)."""
        self.authorize(credentials)
        return sorted(name for name, state in self.repository.models.items() if state.ready)

    def repository_index(self, ready_only: bool, credentials: bytes | None) -> list[dict[str, str]]:
        self.authorize(credentials)
        return control.index(self.repository, ready_only)

    async def load_model(self, name: str, credentials: bytes | None, parameters: Mapping[str, object]) -> None:
        """Triton's load may carry a model config or files to load instead of the repository's: not here."""
        self._may_change(credentials)
        given = sorted(k for k in parameters if k != "unload_dependents")
        if given:
            raise BadRequest(f"bnfold loads models only from its repository: parameter(s) {', '.join(given)} not taken")
        await control.load(self.repository, name)

    async def unload_model(self, name: str, credentials: bytes | None) -> None:
        self._may_change(credentials)
        await control.unload(self.repository, name)

    def _may_change(self, credentials: bytes | None) -> None:
        self.authorize(credentials)
        if self.draining:
            raise Unavailable("the server is shutting down")
        if self.settings.workers > 1:
            raise BadRequest(
                f"loading and unloading need one worker process: each of the {self.settings.workers} has its own "
                "models (BNFOLD_WORKERS=1, or repository polling)"
            )

    # ------------------------------------------------------------------------------------ inference
    def compute_for(self, model: LoadedModel) -> Compute:
        """What runs this model's work: its batcher when it batches (made on first use), else the scheduler."""
        if model.batching is None:
            return self.scheduler
        batcher = self._batchers.get(model)
        if batcher is None:
            metrics = self.metrics.batch(model.name, model.version)
            batcher = self._batchers[model] = Batcher(model, model.batching, self.scheduler, metrics)
        return batcher

    def admit(self, name: str, version: str | None, credentials: bytes | None, transport: str) -> Admission:
        """Authorize, look the model up and take a place in the queue (or :class:`Busy`): the start of one
        inference. Use the answer as a context manager around decoding and :meth:`Admission.run`."""
        started = time.monotonic()
        self.authorize(credentials)
        # what serves now, as published (a miss: the full lookup, which finds it or says why not)
        model = self.repository.serving.get((name, version)) or self.repository.get(name, version)
        key = (model.name, model.version, model.provider, transport)
        bound = self.metrics.bound.get(key) or self.metrics.bind(*key)
        try:
            self.scheduler.admit(model)  # an unload of this version waits until the request is released
        except Busy as exc:
            bound.failure(exc.kind).inc()
            raise
        return Admission(model, self.compute_for(model), self.scheduler, bound, transport, started)


class Admission:
    """One admitted inference: its model, what computes it, its place in the queue and its metrics.

    Leaving the ``with`` block gives the place back and counts the outcome: a success with its timings, or a
    failure by its error's kind; an unexpected exception is logged and leaves as :class:`Internal`.
    """

    def __init__(
        self, model: LoadedModel, compute: Compute, scheduler: Scheduler, bound: Bound, transport: str, started: float
    ) -> None:
        self.model = model
        self.compute = compute
        self.scheduler = scheduler
        self.bound = bound
        self.transport = transport
        self.started = started
        self.queued = 0.0
        self.compute_seconds = 0.0

    async def run(self, request: InferRequest, encode: Encoder[T], deadline: float | None = None) -> T:
        """The decoded ``request`` through the runtime: validate, compute (queue, deadline, compute thread),
        outputs, then ``encode`` in the compute thread. ``deadline`` (``time.monotonic()``) is the transport's
        own, a gRPC deadline; the request's V2 ``timeout`` parameter can only shorten it."""
        if request.timeout_us is not None:
            own = self.started + request.timeout_us / 1e6
            deadline = own if deadline is None else min(deadline, own)
        work = prepare(self.model, request, encode)
        answer, self.queued = await self.compute.run(work, deadline)
        self.compute_seconds = work.timing.compute_seconds
        return answer

    def __enter__(self) -> Admission:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.scheduler.release(self.model)
        bound, model = self.bound, self.model
        if exc is None:
            bound.success.inc()
            bound.queue_seconds.observe(self.queued)
            bound.compute_seconds.observe(self.compute_seconds)
            bound.request_seconds.observe(time.monotonic() - self.started)
        elif isinstance(exc, ServiceError):
            bound.failure(exc.kind).inc()
            if type(exc) is Internal:
                log.error("%s inference of %s/%s failed: %s", self.transport, model.name, model.version, exc.message)
        elif isinstance(exc, asyncio.CancelledError):
            bound.failure(ClientGone.kind).inc()
        elif isinstance(exc, Exception):
            bound.failure(Internal.kind).inc()
            log.error(
                "internal error in %s inference of %s/%s", self.transport, model.name, model.version, exc_info=exc
            )
            raise Internal() from None
