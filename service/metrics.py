"""Prometheus metrics of inference requests (health probes and metadata are not counted), labelled with the
transport that served them (``rest``, ``grpc``); failures with the error's kind (:mod:`service.errors`).

Each app gets its own registry, so several apps in one process (tests) do not collide. With several worker
processes, each process exports its own figures; scrape through the container or sum per instance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

LABELS = ("model", "version", "provider", "transport")
# from 100 µs (tiny models) to 10 s (big ones on a slow CPU)
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# rows per ONNX Runtime run of a batched model
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


@dataclass
class BatchMetrics:
    """One batched model version's figures: rows per execution, executions, and each request's wait."""

    size: Any
    executions: Any
    delay: Any

    def observe(self, rows: int, waits: list[float]) -> None:
        """One ONNX Runtime run of ``rows`` rows; ``waits``: seconds each request queued (thread-safe)."""
        self.size.observe(rows)
        self.executions.inc()
        for wait in waits:
            self.delay.observe(wait)


@dataclass
class Bound:
    """The metrics of one (model, version, provider), labels resolved once rather than per request."""

    success: Any
    request_seconds: Any
    queue_seconds: Any
    compute_seconds: Any
    _failure: Any
    _labels: tuple[str, str, str, str]
    _by_kind: dict[str, Any] = field(default_factory=dict)

    def failure(self, kind: str) -> Any:
        child = self._by_kind.get(kind)
        if child is None:
            child = self._by_kind[kind] = self._failure.labels(*self._labels, kind)
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter("bnfold_inference_success", "Successful inference requests", LABELS, registry=r)
        self.failure = Counter("bnfold_inference_failure", "Failed inference requests", (*LABELS, "error"), registry=r)
        self.request_seconds = Histogram(
            "bnfold_request_duration_seconds",
            "Inference request time, admission to answer",
            LABELS,
            buckets=BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "bnfold_queue_duration_seconds", "Time waiting for a compute slot", LABELS, buckets=BUCKETS, registry=r
        )
        self.compute_seconds = Histogram(
            "bnfold_compute_duration_seconds", "ONNX Runtime run time", LABELS, buckets=BUCKETS, registry=r
        )
        self.in_flight = Gauge(
            "bnfold_requests_in_flight", "Inference requests admitted and not answered (all transports)", registry=r
        )
        self.model_ready = Gauge(
            "bnfold_model_ready", "1 when the model version serves", ("model", "version", "provider"), registry=r
        )
        self.server_info = Gauge(
            "bnfold_server_info",
            "1, labelled with the event loop and HTTP parser that serve",
            ("loop", "http"),
            registry=r,
        )

        self.batch_size = Histogram(
            "bnfold_batch_size",
            "Rows per ONNX Runtime run of a dynamically batched model",
            ("model", "version"),
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.executions = Counter(
            "bnfold_inference_exec_count",
            "ONNX Runtime runs of a dynamically batched model (compare with bnfold_inference_success: requests)",
            ("model", "version"),
            registry=r,
        )
        self.batch_delay = Histogram(
            "bnfold_batch_queue_duration_seconds",
            "Time a request of a dynamically batched model waited for its batch to start",
            ("model", "version"),
            buckets=BUCKETS,
            registry=r,
        )
        #: the metrics of each (model, version, provider, transport) seen so far: a request reads its own here
        #: and calls :meth:`bind` only the first time
        self.bound: dict[tuple[str, str, str, str], Bound] = {}

    def bind(self, model: str, version: str, provider: str, transport: str) -> Bound:
        """The metrics of one (model, version, provider, transport), made once and kept in :attr:`bound`."""
        key = (model, version, provider, transport)
        bound = self.bound.get(key)
        if bound is None:
            bound = self.bound[key] = Bound(
                self.success.labels(*key),
                self.request_seconds.labels(*key),
                self.queue_seconds.labels(*key),
                self.compute_seconds.labels(*key),
                self.failure,
                key,
            )
        return bound

    def batch(self, model: str, version: str) -> BatchMetrics:
        return BatchMetrics(
            self.batch_size.labels(model, version),
            self.executions.labels(model, version),
            self.batch_delay.labels(model, version),
        )

    def add_samples(self, samples: Callable[[], Iterable[tuple[str, dict[str, str], float]]]) -> None:
        """Figures read only when scraped: ``samples()`` yields (name, labels, value); names ending in ``_total``
        are counters, the others gauges (help texts in :data:`HELP`)."""
        self.registry.register(_Samples(samples))

    def export(self) -> bytes:
        return generate_latest(self.registry)


HELP = {
    "bnfold_connections_open": "Open client connections, by transport",
    "bnfold_connections_max": "Open connections allowed, by transport (BNFOLD_MAX_CONNECTIONS or the file limit)",
    "bnfold_connections_closed_total": "Connections the server closed or refused, by transport and reason",
}


class _Samples(Collector):
    def __init__(self, samples: Callable[[], Iterable[tuple[str, dict[str, str], float]]]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Any] = {}
        for name, labels, value in self.samples():
            family = families.get(name)
            if family is None:
                kind = CounterMetricFamily if name.endswith("_total") else GaugeMetricFamily
                base = name.removesuffix("_total")
                family = families[name] = kind(base, HELP.get(name, name), labels=list(labels))
            family.add_metric(list(labels.values()), value)
        yield from families.values()
