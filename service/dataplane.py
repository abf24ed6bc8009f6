"""The protocol-agnostic core both transports call: model lookup, the API key decision, admission and queue,
deadlines, metrics, and inference on already-decoded tensors. Errors leave as :mod:`service.errors` classes
(a meaning, not a status code); a transport only decodes its wire format, calls in here, and encodes.

One inference (:meth:`DataPlane.infer`)::

    authorize -> look the model up -> admit (or Busy) -> transport decodes the request (it may read a body)
      -> check it against the model -> Work(feeds, outputs, finish) -> scheduler (queue, deadline, compute
      thread: ONNX Runtime, then classification and the transport's encoder) -> release, metrics

Admission comes before the body is read, so a flood of slow uploads is bounded by the queue too. The
scheduler is the seam for batching: :meth:`DataPlane.compute_for` picks what runs a model's
:class:`~service.scheduler.Work`: the scheduler, or the model's :class:`~service.batcher.Batcher` (same ``run``),
which joins concurrent requests into one run on the scheduler's threads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import onnxruntime as ort

from service import memory, metadata, serverinfo
from service.batcher import Batcher
from service.errors import ClientGone, Internal, ServiceError, Unauthorized, Unavailable
from service.metrics import Metrics
from service.model import LoadedModel
from service.outputs import output_tensors
from service.repository import Repository
from service.scheduler import Scheduler, Work
from service.settings import Settings
from service.tensors import Array, InferRequest, InferResult
from service.validation import check_inputs, check_outputs

T = TypeVar("T")
log = logging.getLogger("bnfold.service")

Decode = Callable[[LoadedModel], Awaitable[InferRequest]]
Encode = Callable[[InferResult], T]


class DataPlane:
    """Everything a transport needs; one per process, shared by REST and gRPC."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.repository = Repository(settings, on_change=self._model_changed)
        self.scheduler: Scheduler | None = None
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
        return self.started and not self.draining and self.repository.ready_count() > 0

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

    # ------------------------------------------------------------------------------------ inference
    def compute_for(self, model: LoadedModel) -> Scheduler | Batcher:
        """What runs this model's work: its batcher when it batches (made on first use), else the scheduler."""
        assert self.scheduler is not None, "the dataplane has not started"
        if model.batching is None:
            return self.scheduler
        batcher = self._batchers.get(model)
        if batcher is None:
            metrics = self.metrics.batch(model.name, model.version)
            batcher = self._batchers[model] = Batcher(model, model.batching, self.scheduler, metrics)
        return batcher

    async def infer(
        self,
        name: str,
        version: str | None,
        credentials: bytes | None,
        transport: str,
        decode: Decode,
        encode: Encode[T],
        deadline: float | None = None,
    ) -> T:
        """One inference request, from the transport's ``decode`` to its ``encode``d answer.

        ``decode(model)`` turns the request into tensors once it is admitted (it may read the body); ``encode``
        runs in the compute thread on the result. ``deadline`` (``time.monotonic()``) is the transport's own,
        a gRPC deadline; the request's V2 ``timeout`` parameter can only shorten it.
        """
        started = time.monotonic()
        model = self.model(name, version, credentials)
        assert self.scheduler is not None, "the dataplane has not started"
        scheduler = self.scheduler
        compute = self.compute_for(model)
        bound = self.metrics.bind(model.name, model.version, model.provider, transport)
        try:
            scheduler.admit()
            try:
                request = await decode(model)
                feeds = check_inputs(model, request)
                names = check_outputs(model, request)
                if request.timeout_us is not None:
                    own = started + request.timeout_us / 1e6
                    deadline = own if deadline is None else min(deadline, own)
                finish = partial(_finish, model, request, names, encode)
                work: Work[T] = Work(model, feeds, names, finish)
                if deadline is None:
                    result, queued = await compute.run(work, None, None)
                else:
                    work.run_options = options = ort.RunOptions()
                    result, queued = await compute.run(work, deadline, partial(setattr, options, "terminate", True))
            finally:
                scheduler.release()
        except ServiceError as exc:
            bound.failure(exc.kind).inc()
            if type(exc) is Internal:
                log.error("%s inference of %s/%s failed: %s", transport, model.name, model.version, exc.message)
            raise
        except asyncio.CancelledError:
            bound.failure(ClientGone.kind).inc()
            raise
        except Exception:
            bound.failure(Internal.kind).inc()
            log.exception("internal error in %s inference of %s/%s", transport, model.name, model.version)
            raise Internal() from None
        bound.success.inc()
        bound.queue_seconds.observe(queued)
        bound.compute_seconds.observe(work.timing.compute_seconds)
        bound.request_seconds.observe(time.monotonic() - started)
        return result

    # ------------------------------------------------------------------------------------ lifecycle
    def _model_changed(self, model: LoadedModel, ready: bool) -> None:
        self.metrics.model_ready.labels(model.name, model.version, model.provider).set(1 if ready else 0)

    async def start(self) -> None:
        s = self.settings
        ort.disable_telemetry_events()  # a server has no business phoning home (and a read-only root complains)
        if s.reuse_large_buffers:
            memory.reuse_large_buffers()
        self.scheduler = Scheduler(s.max_concurrency, s.max_queue, s.retry_after_seconds)
        scheduler = self.scheduler
        self.metrics.in_flight.set_function(lambda: scheduler.admitted)
        await self.repository.load_all()
        # everything loaded so far lives as long as the process: keep the garbage collector from rescanning it
        gc.collect()
        gc.freeze()
        self.started = True
        loop, parser = serverinfo.event_loop(), serverinfo.http_parser()
        self.metrics.server_info.labels(loop, parser).set(1)
        log.info("event loop %s, HTTP parser %s", loop, parser)
        log.info("ready: %d model version(s) serving", self.repository.ready_count())

    async def poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_seconds)
            try:
                await self.repository.rescan()
            except Exception:  # a scan must never kill the poller
                log.exception("repository rescan failed")

    def stop(self) -> None:
        self.draining = True
        if self.scheduler is not None:
            self.scheduler.close()


def _finish(model: LoadedModel, request: InferRequest, names: list[str], encode: Encode[T], arrays: list[Array]) -> T:
    """In the compute thread, after ONNX Runtime: classification, then the transport's encoder."""
    return encode(InferResult(model.name, model.version, request.id, output_tensors(model, request, names, arrays)))
