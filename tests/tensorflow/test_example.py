"""examples.tensorflow.end_to_end: train → SavedModel → bnfold convert → bnfold serve → V2 requests."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from examples.tensorflow import end_to_end

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert end_to_end.main(["--workdir", str(tmp_path), "--steps", "15"]) == 0
    out = capsys.readouterr().out
    assert "4 per-channel maps folded (BatchNorms, and a conv bias Add); left: {'batchnorm': 0, 'mul_add': 0}" in out
    assert "verification passed against TensorFlow inference" in out
    assert "served answers equal to ONNX Runtime's: 6/6" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manual_bn",
        "manual_bn.onnx",
        "manual_bn.report.json",
        "manual_bn.server.log",
    ]
