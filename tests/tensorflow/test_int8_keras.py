"""INT8 with a Keras source: exported with tf2onnx, folded, quantized and proved through the same pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

from converter import Int8Options, convert_keras
from examples.tensorflow import cases

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_convert_keras_int8(tmp_path: Path) -> None:
    model = cases.build("Conv2D")
    npz = tmp_path / "samples.npz"
    np.savez(npz, input=np.random.default_rng(0).standard_normal((25, 8, 8, 3)).astype(np.float32))
    result = convert_keras(model, int8=Int8Options(min_snr_db=15), inputs=[npz])
    info = result.report.int8
    assert info is not None and info.passed and (info.calibration_samples, info.verification_samples) == (20, 5)
    assert info.outputs[0].top1 is None and info.outputs[0].snr_db > 15  # 4-D output: judged by SNR
    assert "DequantizeLinear" in {n.op_type for n in result.model.graph.node}
    assert [r.folded for r in info.layers] == [[layer.name] for layer in result.report.folded]
