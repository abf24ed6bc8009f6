"""Real `bnfold serve` processes and a real Chromium (Debian's package, driven by Playwright).

Playwright's own browser download is unreachable here, so the tests use the system's chromium
(``PLAYWRIGHT_CHROMIUM`` or ``/usr/bin/chromium``; ``apt-get install chromium``). Without it the browser tests
are skipped on a developer's machine and FAIL under CI (``CI=true``), so CI cannot pass them by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from converter.zoo import Builder, conv_bn
from service.settings import BUNDLED_REPOSITORY
from tests.support.servers import Server, save, start

CHROMIUM = Path(os.environ.get("PLAYWRIGHT_CHROMIUM", "/usr/bin/chromium"))

#: The picture models' preprocessing, as their config.json states it (the page reads it from /config).
IMAGE_CONFIGS: dict[str, dict[str, Any]] = {
    "image": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "image_nhwc": {"scale": 255, "mean": [120, 110, 100], "std": [60, 55, 50], "layout": "NHWC"},
}
IMAGE_LABELS = ["cat", "dog", "ship", "frog"]


def image_model(layout: str) -> onnx.ModelProto:
    """A 32×32 RGB classifier with BatchNorm (folded on load): NCHW ``1×3×32×32`` or NHWC ``1×32×32×3``."""
    b = Builder(seed=3)
    if layout == "NCHW":
        x = b.input("image", [1, 3, 32, 32])
    else:
        x = b.node("Transpose", [b.input("image", [1, 32, 32, 3])], perm=[0, 3, 1, 2])
    x = b.relu(conv_bn(b, x, 3, 8, 3, 2))
    b.output(b.gemm(b.global_pool(x), 8, len(IMAGE_LABELS)), "logits")
    return b.build("image")


def vector_model() -> onnx.ModelProto:
    """x [batch, 4] FP32 -> y = 2x: for the JSON editor."""
    b = Builder()
    x = b.input("x", ["batch", 4])
    b.output(b.node("Mul", [x, b.const(np.array(2.0, np.float32))]), "y")
    return b.build("vector")


def build_ui_repository(root: Path) -> Path:
    shutil.copytree(BUNDLED_REPOSITORY / "digits", root / "digits")
    for name, layout in (("image", "NCHW"), ("image_nhwc", "NHWC")):
        config = {**IMAGE_CONFIGS[name], "labels": {"logits": IMAGE_LABELS}}
        save(image_model(layout), root, name, config=json.dumps(config))
    save(vector_model(), root, "vector")
    return root


@pytest.fixture(scope="session")
def ui_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_ui_repository(tmp_path_factory.mktemp("ui-repo"))


@pytest.fixture(scope="session")
def ui_server(ui_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(tmp_path_factory.mktemp("ui-logs"), "--model-repository", str(ui_repo))
    yield srv
    assert srv.stop() == 0, srv.output()[-2000:]


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: CI must run the browser tests (.ci/run installs chromium)")
    pytest.skip(reason)


# package scope, not session: Playwright's sync API keeps an event loop running in the main thread while it is
# open, and every later test that calls asyncio.run() would fail ("cannot be called from a running event loop")
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        _missing(f"no chromium at {CHROMIUM} (apt-get install chromium, or set PLAYWRIGHT_CHROMIUM)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()
