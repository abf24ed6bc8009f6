"""How the service serves the page (no browser needed): BNFOLD_UI, headers, package data, the examples file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from examples.digits.page_examples import render
from service.rest.webui import STATIC
from tests.support.servers import Server, in_process


def test_page_and_its_files_are_served(ui_server: Server) -> None:
    with ui_server.client() as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="ui/app.js" defer></script>' in page.text
        assert c.head("/").status_code == 200
        for name, kind in (("app.js", "javascript"), ("app.css", "text/css"), ("digits.json", "application/json")):
            r = c.get(f"/ui/{name}")
            assert r.status_code == 200 and kind in r.headers["content-type"], name
        assert c.get("/ui/../settings.py").status_code == 404
        assert c.get("/docs").status_code == 200
        # what the page reads for a picture model: its preprocessing, from config.json
        pre = c.get("/v2/models/image_nhwc/config").json()["bnfold"]["preprocessing"]
        assert pre == {"scale": 255, "mean": [120, 110, 100], "std": [60, 55, 50], "layout": "NHWC"}


def test_ui_false_makes_the_root_a_404() -> None:
    with in_process(ui=False) as server, server.client() as c:
        root = c.get("/")
        assert (root.status_code, root.json()) == (404, {"error": "Not Found"})
        assert c.get("/ui/app.js").status_code == 404
        assert c.get("/docs").status_code == 200
        assert c.get("/v2/models/digits").status_code == 200


def test_invalid_preprocessing_in_config_is_refused(tmp_path: Path) -> None:
    from service.errors import ModelLoadError
    from service.runtime.model_config import ModelConfig

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"std": [0.2, 0.0, 0.2]}))
    with pytest.raises(ModelLoadError, match="invalid config"):
        ModelConfig.read(path)
    path.write_text(json.dumps({"layout": "CHWN"}))
    with pytest.raises(ModelLoadError, match="invalid config"):
        ModelConfig.read(path)


def test_digit_examples_are_what_the_script_writes() -> None:
    """service/static/digits.json is `python -m examples.digits.page_examples`' output, one image per class."""
    shipped = (STATIC / "digits.json").read_text()
    assert shipped == render()
    examples = json.loads(shipped)["examples"]
    assert [e["label"] for e in examples] == list(range(10))
    assert all(len(e["pixels"]) == 64 and 0 <= min(e["pixels"]) <= max(e["pixels"]) <= 16 for e in examples)


def test_the_page_files_ship_in_the_package() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service.rest"]
    shipped = {p.name for g in globs for p in (root / "service" / "rest").glob(g)}
    assert {"index.html", "app.js", "app.css", "digits.json"} <= shipped


def test_the_page_is_read_once_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reinstalling bnfold under a running server replaces or removes the package's files: the page and its files
    still answer, as they were at start-up (with ETags, so a browser revalidates cheaply)."""
    from service.rest import webui

    copy = tmp_path / "static"
    shutil.copytree(STATIC, copy)
    monkeypatch.setattr(webui, "STATIC", copy)
    with in_process() as server, server.client() as c:
        shutil.rmtree(copy)
        page = c.get("/")
        assert page.status_code == 200 and page.content == (STATIC / "index.html").read_bytes()
        script = c.get("/ui/app.js")
        assert script.status_code == 200 and script.content == (STATIC / "app.js").read_bytes()
        assert "javascript" in script.headers["content-type"]
        assert c.get("/ui/app.js", headers={"If-None-Match": script.headers["etag"]}).status_code == 304
        assert c.get("/ui/missing.js").status_code == 404
