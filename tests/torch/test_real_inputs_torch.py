"""Real inputs with a PyTorch source: the samples run through ONNX Runtime and through PyTorch itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from converter import VerificationError, convert_torch
from tests.torch.nets import ARCHITECTURES, inputs, trained

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_samples_are_checked_against_pytorch_too(tmp_path: Path) -> None:
    module, shape, _ = ARCHITECTURES["resnet"]()
    trained(module, shape)
    example = inputs((1, *shape[1:]), seed=1)
    npz = tmp_path / "s.npz"
    np.savez(npz, input=np.random.default_rng(2).standard_normal((5, *shape[1:])).astype(np.float32))
    report = convert_torch(module, example, inputs=[npz]).report
    checks = [(v.reference, v.runs, v.passed) for v in report.verifications]
    assert checks == [
        ("the exported ONNX model", 1, True),
        ("the exported ONNX model", 5, True),
        ("PyTorch eval on the example inputs", 1, True),
        (f"PyTorch eval on 5 samples from {npz}", 5, True),
    ]


def test_pytorch_disagreeing_on_a_sample_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module whose forward differs from its export on the samples: only PyTorch can tell."""
    module = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).eval()
    example = torch.zeros(1, 1, 2, 2)
    npz = tmp_path / "s.npz"
    np.savez(npz, input=np.ones((3, 1, 2, 2), np.float32))
    convert_torch(module, example, inputs=[npz])  # agrees
    original = module.forward

    def shifted(input: torch.Tensor) -> torch.Tensor:  # zeros (the export's example) pass; samples do not
        out: torch.Tensor = original(input)
        return out if bool((input == 0).all()) else out + 1.0

    monkeypatch.setattr(module, "forward", shifted)
    with pytest.raises(VerificationError, match="verification against PyTorch failed"):
        convert_torch(module, example, inputs=[npz])
