"""Fold-on-load with real inputs: ``DIR/<name>/samples.npz`` verifies the fold and warms the model up."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.settings import BUNDLED_REPOSITORY
from tests.support.servers import in_process


def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    return repo


def test_samples_verify_the_fold_and_warm_up(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    assert (repo / "digits" / "samples.npz").is_file()
    with in_process(model_repository=repo, warmup_runs=3) as srv, srv.client() as http:
        meta = http.get("/v2/models/digits").json()["bnfold"]
    check = meta["folded"]["verification"]
    assert check == {
        "passed": True,
        "max_abs": check["max_abs"],
        "inputs": "samples.npz",
        "runs": 100,
        "top1": {"logits": 1.0},
    }
    assert meta["warmup_inputs"] == "100 samples from samples.npz"


def test_without_samples_random_inputs(tmp_path: Path) -> None:
    repo = repository(tmp_path)
    (repo / "digits" / "samples.npz").unlink()
    with in_process(model_repository=repo) as srv, srv.client() as http:
        meta = http.get("/v2/models/digits").json()["bnfold"]
    assert meta["folded"]["verification"]["inputs"] == "random"
    assert meta["folded"]["verification"]["runs"] == 1
    assert meta["warmup_inputs"] == "seed 0 random inputs"


@pytest.mark.parametrize("fold", [True, False])
def test_samples_that_do_not_fit_leave_the_model_unready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fold: bool
) -> None:
    repo = repository(tmp_path)
    np.savez(repo / "digits" / "samples.npz", image=np.zeros((2, 1, 8, 8), np.float32))
    settings = {"model_repository": repo, "fold_on_load": fold}
    with caplog.at_level(logging.WARNING, "bnfold"), in_process(**settings) as srv, srv.client() as http:
        assert http.get("/v2/models/digits/ready").status_code == 503
    assert "image names no input of the model" in caplog.text
