"""One REST and one gRPC inference, traced call by call (:mod:`tests.support.request_path`): the request goes
down the layers and the only call back up is the transport's encoder, which the runtime applies last on the
compute thread; the transport is never called back on the event loop (it reads and decodes before the core runs);
and the number of service modules and rooms a request visits does not grow unnoticed."""

from __future__ import annotations

import pytest

from tests.support.layers import LAYERS, layer
from tests.support.request_path import Trace, trace_both

#: service modules one inference enters (docs/architecture.md lists them): its transport's handler and codec, the
#: dataplane, the runtime's compute and work, one module of v2; raise only with a reason. gRPC enters v2.binary
#: besides v2.fields as long as its codec converts numeric raw contents through it.
MODULES_AT_MOST = {"rest": 6, "grpc": 6}
ROOMS_AT_MOST = 4  # its transport, the dataplane, the runtime, v2 (metrics are objects it updates, not calls)


@pytest.fixture(scope="module")
def traces() -> dict[str, Trace]:
    return trace_both()


def upward(caller: str, callee: str) -> bool:
    return layer(callee)[0] < layer(caller)[0]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_only_call_up_the_layers_is_the_encoder_on_the_compute_thread(
    traces: dict[str, Trace], transport: str
) -> None:
    trace = traces[transport]
    assert trace.modules[0] == f"service.{transport}.{'asgi' if transport == 'rest' else 'server'}"
    up = [(caller, callee, thread) for caller, callee, thread in trace.edges if upward(caller, callee)]
    assert up == [("service.runtime.work", f"service.{transport}.codec", "compute")]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_an_inference_visits_few_modules_and_rooms(traces: dict[str, Trace], transport: str) -> None:
    trace = traces[transport]
    rooms = {layer(m)[1] for m in trace.modules}
    assert len(trace.modules) <= MODULES_AT_MOST[transport], trace.modules
    assert len(rooms) <= ROOMS_AT_MOST, sorted(rooms)
    assert {LAYERS[layer(m)[0]][0] for m in trace.modules} == {"transports", "dataplane", "runtime", "v2"}
