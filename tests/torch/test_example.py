"""examples.pytorch.end_to_end: train → TorchScript → bnfold convert → bnfold serve → V2 requests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from examples.pytorch import end_to_end

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert end_to_end.main(["--workdir", str(tmp_path), "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "4 BatchNorms folded" in out
    assert "verification passed against PyTorch eval" in out
    assert "same class for 200/200 images" in out
    assert "served answers equal to ONNX Runtime's: 8/8" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shapes.onnx",
        "shapes.pt",
        "shapes.report.json",
        "shapes.server.log",  # the server's log beside the model, not in a folder of its own under /tmp
    ]


@pytest.mark.parametrize("keep", [False, True])
def test_a_run_without_workdir_leaves_nothing_behind_unless_kept(
    keep: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes the run's folder
    assert end_to_end.main(["--steps", "2", "--no-serve", *(["--keep"] if keep else [])]) == 0
    left = list(tmp_path.iterdir())
    if keep:
        assert [p.name.startswith("bnfold-pytorch-") for p in left] == [True]
        assert f"kept {left[0]}" in capsys.readouterr().out
        assert (left[0] / "shapes.onnx").exists()
    else:
        assert left == []
