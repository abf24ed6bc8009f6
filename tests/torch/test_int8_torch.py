"""INT8 with a PyTorch source: the same fold-then-quantize pipeline, in Python and from a TorchScript file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from converter import Int8Options, convert_torch
from converter.cli import main
from tests.torch.nets import ARCHITECTURES, inputs, trained

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


def samples(tmp_path: Path, shape: tuple[int, ...], count: int = 30) -> Path:
    npz = tmp_path / "samples.npz"
    np.savez(npz, input=np.random.default_rng(3).standard_normal((count, *shape[1:])).astype(np.float32))
    return npz


def test_convert_torch_int8(tmp_path: Path) -> None:
    module, shape, _ = ARCHITECTURES["resnet"]()
    trained(module, shape)
    result = convert_torch(
        module, inputs((1, *shape[1:]), seed=1), int8=Int8Options(min_top1=0), inputs=[samples(tmp_path, shape)]
    )
    info = result.report.int8
    assert info is not None and info.passed
    assert (info.calibration_samples, info.verification_samples) == (24, 6)
    assert info.outputs[0].snr_db > 15
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in result.model.graph.node}
    assert len(info.layers) == len(result.report.folded)  # every fold's layer, with its weight ranges
    assert any(v.reference.startswith("PyTorch eval") and v.passed for v in result.report.verifications)


def test_torchscript_file_int8_from_the_command_line(tmp_path: Path) -> None:
    module, shape, _ = ARCHITECTURES["resnet"]()
    trained(module, shape)
    scripted = tmp_path / "resnet.pt"
    torch.jit.script(module).save(str(scripted))
    out = tmp_path / "resnet.int8.onnx"
    args = ["--input-shape", "1,3,32,32", "--int8", "--min-top1", "0", "--inputs", str(samples(tmp_path, shape))]
    assert main(["convert", str(scripted), "-o", str(out), "-q", *args]) == 0
    assert "DequantizeLinear" in {n.op_type for n in onnx.load(str(out)).graph.node}
