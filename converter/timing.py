"""Seconds per phase of a conversion, in the order the phases ran (the report's ``seconds``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class Phases:
    """``with phases("verify"): ...`` adds the block's wall time to ``seconds["verify"]``; ``total`` is the
    time since the timer was made, set by :meth:`finish`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick

    def finish(self) -> dict[str, float]:
        self.seconds.pop("total", None)
        self.seconds["total"] = time.perf_counter() - self.start
        return self.seconds
