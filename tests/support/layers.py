"""The service's layers, top to bottom, as docs/architecture.md draws them (tests/test_layers.py enforces them on
the imports, tests/service/test_request_path.py on the calls of one inference)."""

from __future__ import annotations

LAYERS: list[tuple[str, tuple[str, ...]]] = [  # top to bottom
    ("entry", ("service.cli", "service.server", "service.launcher", "service.__main__")),
    ("transports", ("service.rest", "service.grpc")),
    ("dataplane", ("service.dataplane",)),
    ("runtime", ("service.runtime",)),
    ("v2", ("service.v2",)),
    (
        "shared",
        (
            "service.errors",
            "service.metrics",
            "service.settings",
            "service.logging_setup",
            "service.connections",
            "service",
        ),
    ),
]


def layer(module: str) -> tuple[int, str]:
    """(depth, room) of a service module: the layer with the longest matching prefix."""
    best = (-1, "", "")
    for depth, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best[2]):
                best = (depth, prefix, prefix)
    assert best[0] >= 0, f"{module} is in no layer of tests.support.layers.LAYERS: give it one"
    return best[0], best[1]
