"""examples.pytorch.end_to_end: train → TorchScript → bnfold convert → bnfold serve → V2 requests."""

from __future__ import annotations

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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes.onnx", "shapes.pt", "shapes.report.json"]
