"""The web page at `/` in a real Chromium against a real server: models at a glance, every "Try it" path,
the API key, phone width, no console errors, and a small total transfer."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from converter import convert
from service.settings import BUNDLED_REPOSITORY
from tests.browser.conftest import IMAGE_CONFIGS, IMAGE_LABELS, Console, image_model
from tests.support.servers import Server, start

pytestmark = pytest.mark.slow  # chromium and a `bnfold serve` subprocess

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "images" / "ui.png"
STATUS = re.compile(r"^(\S+) \((\d\.\d\d)\)$")  # "3 (0.98)"
PAGE_BUDGET = 100_000  # bytes on the wire to load the page and everything it fetches


def open_page(context: Any, server: Server) -> tuple[Any, Console]:
    page = context.new_page()
    console = Console(page)
    page.goto(server.url + "/")
    return page, console


def card(page: Any, name: str) -> Any:
    """The model's card, once its metadata has loaded (its Run button exists)."""
    section = page.locator("section.card").filter(has=page.locator("h2 .name", has_text=re.compile(f"^{name}$")))
    section.get_by_role("button", name="Run").wait_for()
    return section


def runs(section: Any) -> int:
    return int(section.locator(".result").get_attribute("data-runs") or 0)


def after_run(page: Any, section: Any, action: Any) -> str:
    """Do ``action`` and wait until the card has finished one more request; the status text it shows."""
    before = runs(section)
    action()
    handle = section.locator(".result").element_handle()
    page.wait_for_function("([el, n]) => Number(el.dataset.runs || 0) > n", arg=[handle, before])
    return str(section.get_by_role("status").text_content())


def wait_for_requests(page: Any, name: str, count: int) -> None:
    """Until the live counters (read from /metrics) show ``count`` requests of model ``name``."""
    page.wait_for_function(
        """([name, count]) => [...document.querySelectorAll("section.card")].some((c) =>
             c.querySelector(".name").textContent === name &&
             Number(c.querySelector("table.versions tbody td:nth-child(4)").textContent) >= count)""",
        arg=[name, count],
    )


def raw_output(section: Any) -> dict[str, Any]:
    return json.loads(section.locator("pre.raw").text_content())  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------ at a glance
def test_page_shows_digits_ready_with_its_folds_within_budget(context: Any, ui_server: Server) -> None:
    sizes: list[int] = []
    page = context.new_page()
    console = Console(page)
    page.on("requestfinished", lambda r: sizes.append(r.sizes()["responseBodySize"] + r.sizes()["responseHeadersSize"]))
    page.goto(ui_server.url + "/")
    digits = card(page, "digits")
    for name in ("image", "image_nhwc", "vector"):
        card(page, name)
    page.wait_for_load_state("networkidle")

    assert digits.locator(".badge").text_content() == "ready"
    assert digits.locator("table.versions tbody tr td").nth(1).text_content() == "ready"
    assert "Folded 3 of 3 BatchNorms" in digits.locator(".fold summary").text_content()
    assert digits.locator(".quantized").count() == 0  # a float model says nothing about quantization
    folds = digits.locator(".fold li").all_text_contents()
    assert folds == ["bn1 → Conv conv1", "bn2 → Conv conv2", "bn3 → Gemm fc1"]
    rows = [r.locator("td").all_text_contents() for r in digits.locator("table.tensors tbody tr").all()]
    assert rows == [["in", "pixels", "FP32", "[?, 1, 8, 8]"], ["out", "logits", "FP32", "[?, 10]"]]
    assert "CPUExecutionProvider" in digits.text_content()
    assert "max batch size 1" in digits.text_content()
    assert "ready" in page.locator("#server").text_content()

    total = sum(sizes)
    assert len(sizes) >= 6, sizes  # page, css, js, metrics, v2, and the models' metadata at least
    assert total < PAGE_BUDGET, f"the page moved {total} bytes"
    assert console.errors == []


def test_the_ten_examples_are_recognised(context: Any, ui_server: Server) -> None:
    page, console = open_page(context, ui_server)
    digits = card(page, "digits")
    right = 0
    for i in range(10):
        status = after_run(page, digits, digits.get_by_role("button", name=f"Example {i}", exact=True).click)
        match = STATUS.match(status)
        assert match, status
        right += match.group(1) == str(i)
        assert len(digits.locator(".bars li").all()) == 5  # top classes as bars
    assert right >= 9, f"{right} of 10 examples recognised"
    assert re.search(r"round trip [\d.]+ ms \(binary tensors\)", digits.locator(".timing").text_content())
    # the live counters follow: ten requests answered, none failed
    wait_for_requests(page, "digits", 10)
    assert digits.locator("table.versions tbody td").nth(4).text_content() == "0"
    assert re.fullmatch(r"[\d.]+ ms", str(digits.locator("table.versions tbody td").nth(5).text_content()))
    assert console.errors == []


def test_drawing_gives_results_while_drawing(context: Any, ui_server: Server) -> None:
    page, console = open_page(context, ui_server)
    digits = card(page, "digits")
    pad = digits.locator("canvas.pad").bounding_box()
    x0, y0, w, h = pad["x"], pad["y"], pad["width"], pad["height"]
    before = runs(digits)
    page.mouse.move(x0 + 0.5 * w, y0 + 0.15 * h)
    page.mouse.down()
    for step in range(1, 11):  # a vertical stroke: a "1"
        page.mouse.move(x0 + 0.5 * w, y0 + (0.15 + 0.07 * step) * h)
    # a result arrives while the pen is still down
    handle = digits.locator(".result").element_handle()
    page.wait_for_function("([el, n]) => Number(el.dataset.runs || 0) > n", arg=[handle, before])
    page.mouse.up()
    assert STATUS.match(str(digits.get_by_role("status").text_content()))

    status = after_run(page, digits, digits.get_by_role("button", name="Clear").click)
    assert STATUS.match(status)  # an empty pad is a valid input too
    assert console.errors == []


def test_keyboard_only(context: Any, ui_server: Server) -> None:
    page, console = open_page(context, ui_server)
    digits = card(page, "digits")
    example = digits.get_by_role("button", name="Example 7", exact=True)
    example.focus()
    status = after_run(page, digits, lambda: page.keyboard.press("Enter"))
    assert status.startswith("7 ("), status
    digits.locator("canvas.pad").focus()  # the pad takes arrow keys and Space
    status = after_run(page, digits, lambda: page.keyboard.press("Space"))
    assert STATUS.match(status)
    page.keyboard.press("ArrowRight")
    status = after_run(page, digits, lambda: page.keyboard.press("Delete"))
    assert STATUS.match(status)
    assert console.errors == []


# ----------------------------------------------------------------------------------- other models
def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour 8-bit RGB PNG (numpy + zlib): resizing and cropping leave every pixel as it is."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = np.zeros((height, 1 + 3 * width), np.uint8)
    rows[:, 1:] = np.tile(np.array(rgb, np.uint8), width)  # filter byte 0, then RGB
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


@pytest.mark.parametrize(("name", "layout"), [("image", "NCHW"), ("image_nhwc", "NHWC")])
def test_a_picture_is_resized_and_normalised_as_config_says(
    context: Any, ui_server: Server, name: str, layout: str
) -> None:
    rgb = (200, 100, 30)
    page, console = open_page(context, ui_server)
    section = card(page, name)
    picture = {"name": "orange.png", "mimeType": "image/png", "buffer": png(48, 40, rgb)}
    status = after_run(page, section, lambda: section.get_by_label(re.compile("^Picture")).set_input_files(picture))

    # what the model should get: pixels as 0..1, times scale, minus mean, over std, in the model's layout
    config = IMAGE_CONFIGS[name]
    pixel = np.array(rgb, np.float64) / 255 * config.get("scale", 1)
    channel = (pixel - np.array(config["mean"])) / np.array(config["std"])
    planes = np.broadcast_to(channel[:, None, None], (3, 32, 32))
    tensor = (planes if layout == "NCHW" else planes.transpose(1, 2, 0))[None].astype(np.float32)
    session = ort.InferenceSession(image_model(layout).SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"image": tensor})

    (out,) = raw_output(section)["outputs"]
    assert out["name"] == "logits"
    np.testing.assert_allclose(np.array(out["data"]), expected.ravel(), rtol=1e-4, atol=1e-5)
    match = STATUS.match(status)
    assert match and match.group(1) == IMAGE_LABELS[int(expected.argmax())], status
    assert console.errors == []


def test_json_editor(context: Any, ui_server: Server) -> None:
    page, console = open_page(context, ui_server)
    section = card(page, "vector")
    editor = section.get_by_label("Request (V2 JSON)")
    prefilled = json.loads(editor.input_value())
    assert prefilled == {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}]}
    status = after_run(page, section, section.get_by_role("button", name="Run").click)
    assert STATUS.match(status), status  # the prefilled request is valid

    prefilled["inputs"][0]["data"] = [1, 2, 3, 4]
    editor.fill(json.dumps(prefilled))
    status = after_run(page, section, section.get_by_role("button", name="Run").click)
    assert status.startswith("3 ("), status
    (out,) = raw_output(section)["outputs"]
    assert (out["name"], out["shape"], out["data"]) == ("y", [1, 4], [2, 4, 6, 8])

    editor.fill("{not json")
    status = after_run(page, section, section.get_by_role("button", name="Run").click)
    assert status.startswith("the request is not valid JSON"), status
    assert console.errors == []

    prefilled["inputs"][0]["shape"] = [1, 5]
    editor.fill(json.dumps(prefilled))
    status = after_run(page, section, section.get_by_role("button", name="Run").click)
    assert status.startswith("400: "), status  # the server's one-line message, shown as it is
    assert [e for e in console.errors if "status of 400" not in e] == []


# --------------------------------------------------------------------------------- API key, phone
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = start(tmp_path_factory.mktemp("keyed"), env={"BNFOLD_API_KEY": "sesame-7"})
    yield srv
    assert srv.stop() == 0, srv.output()[-2000:]


def test_api_key_field_and_the_401_message(context: Any, keyed_server: Server) -> None:
    page, console = open_page(context, keyed_server)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    notice = page.get_by_role("alert")
    notice.get_by_text("401: missing or wrong API key").wait_for()

    key = page.get_by_label("API key")
    key.fill("wrong")
    key.press("Enter")
    page.wait_for_function("() => document.querySelector('#notice').textContent.includes('401')")

    key.fill("sesame-7")
    page.get_by_role("button", name="Use key").click()
    digits = card(page, "digits")
    assert notice.is_hidden()
    status = after_run(page, digits, digits.get_by_role("button", name="Example 4", exact=True).click)
    assert status.startswith("4 ("), status

    key.fill("not-it")
    page.get_by_role("button", name="Use key").click()
    status = after_run(page, digits, digits.get_by_role("button", name="Run").click)
    assert status.startswith("401: missing or wrong API key"), status

    assert all("sesame" not in u and "not-it" not in u for u in [*urls, page.url])
    assert [e for e in console.errors if "status of 401" not in e] == []


# ------------------------------------------------------------------------------------------- INT8
@pytest.fixture(scope="module")
def int8_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The digits model quantized by ``convert(int8=True)`` with its shipped samples."""
    repo = tmp_path_factory.mktemp("int8-repo")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    path = repo / "digits" / "1" / "model.onnx"
    onnx.save(convert(str(path), int8=True, inputs=[repo / "digits" / "samples.npz"]).model, str(path))
    srv = start(tmp_path_factory.mktemp("int8-logs"), "--model-repository", str(repo))
    yield srv
    assert srv.stop() == 0, srv.output()[-2000:]


def test_an_int8_model_says_it_is_quantized(context: Any, int8_server: Server) -> None:
    page, console = open_page(context, int8_server)
    digits = card(page, "digits")
    assert str(digits.locator(".quantized").text_content()).startswith("Quantized: int8 QDQ: activations uint8")
    assert digits.locator(".fold").text_content() == "No BatchNormalization folded on load."
    status = after_run(page, digits, digits.get_by_role("button", name="Example 4", exact=True).click)
    assert status.startswith("4 ("), status
    assert console.errors == []


def test_phone_width(browser: Any, ui_server: Server) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        page, console = open_page(context, ui_server)
        digits = card(page, "digits")
        for name in ("image", "vector"):
            card(page, name)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than the phone"
        run = digits.get_by_role("button", name="Run").bounding_box()
        assert run["x"] >= 0 and run["x"] + run["width"] <= 390
        pad = digits.locator("canvas.pad").bounding_box()
        middle = (pad["x"] + pad["width"] / 2, pad["y"] + pad["height"] / 2)
        status = after_run(page, digits, lambda: page.touchscreen.tap(*middle))
        assert STATUS.match(status), status
        assert console.errors == []
    finally:
        context.close()


# ----------------------------------------------------------------------------------- screenshot
def test_screenshot_of_the_default_server(context: Any, tmp_path: Path) -> None:
    """The README's picture: `bnfold serve` with no arguments, one example run. Written to docs/images/ui.png
    when UPDATE_UI_SCREENSHOT=1 (otherwise to a temporary file, so a test run leaves the tree clean)."""
    server = start(tmp_path)
    try:
        page, console = open_page(context, server)
        page.set_viewport_size({"width": 1100, "height": 640})
        digits = card(page, "digits")
        status = after_run(page, digits, digits.get_by_role("button", name="Example 3", exact=True).click)
        assert status.startswith("3 (")
        wait_for_requests(page, "digits", 1)
        target = SCREENSHOT if os.environ.get("UPDATE_UI_SCREENSHOT") == "1" else tmp_path / "ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target))
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert target.stat().st_size < 200_000
        assert console.errors == []
    finally:
        assert server.stop() == 0
