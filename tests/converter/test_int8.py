"""Fold, then INT8: the command line and Python paths, refusal without samples, the held-out proof and its
thresholds (exit 3, nothing written), and the report of what each fold did to the weight ranges."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import ModelProto, helper, numpy_helper

from converter import InputError, Int8Options, VerificationError, convert, quantize
from converter.cli import main
from converter.quant_report import int8_snr_db, output_quality, snr_db
from tests.converter.graphs import model

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "service" / "models" / "digits" / "1" / "model.onnx"
SAMPLES = ROOT / "service" / "models" / "digits" / "samples.npz"


def op_types(m: ModelProto) -> set[str]:
    return {n.op_type for n in m.graph.node}


def metadata(m: ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in m.metadata_props}


def digits_pixels() -> np.ndarray:
    with np.load(SAMPLES) as archive:
        return np.asarray(archive["pixels"])


def test_cli_quantizes_the_digits_model_with_its_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "digits.int8.onnx", tmp_path / "report.json"
    code = main(["convert", str(DIGITS), "-o", str(out), "--int8", "--inputs", str(SAMPLES), "--report", str(report)])
    assert code == 0
    text = capsys.readouterr().out
    written = onnx.load(str(out))
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(written)
    assert "BatchNormalization" not in op_types(written)
    assert metadata(written)[quantize.METADATA_KEY].startswith("int8 QDQ: activations uint8")
    assert "int8 verification passed against the float model on 20 samples held out of" in text
    data = json.loads(report.read_text())["int8"]
    assert (data["calibration_samples"], data["verification_samples"], data["passed"]) == (80, 20, True)
    (logits,) = data["outputs"]
    assert logits["name"] == "logits" and logits["top1"] >= 0.99 and logits["snr_db"] > 25
    assert [r["layer"] for r in data["layers"]] == ["Conv conv1", "Conv conv2", "Gemm fc1"]
    assert [len(r["after"]) for r in data["layers"]] == [16, 32, 32]


def test_python_path_returns_the_quantized_model_and_writes_nothing() -> None:
    result = convert(str(DIGITS), int8=True, inputs=[SAMPLES])
    assert "DequantizeLinear" in op_types(result.model)
    info = result.report.int8
    assert info is not None and info.passed and not info.random
    assert info.calibrated_on == f"80 samples from {SAMPLES}"
    assert result.report.output is None


def test_verification_never_reuses_calibration_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sample i is filled with the value i: what calibrates and what verifies can be told apart."""
    npz = tmp_path / "s.npz"
    np.savez(npz, pixels=np.arange(12, dtype=np.float32)[:, None, None, None] * np.ones((12, 1, 8, 8), np.float32))
    seen: dict[str, list[float]] = {}
    real_quantize, real_prove = quantize.quantize, quantize.prove

    def spy_quantize(m: ModelProto, feeds: Any, int8: Int8Options) -> ModelProto:
        seen["calibration"] = [float(f["pixels"].flat[0]) for f in feeds]
        return real_quantize(m, feeds, int8)

    def spy_prove(reference: Any, quantized: ModelProto, proof: Any, int8: Int8Options) -> Any:
        seen["verification"] = [float(f["pixels"].flat[0]) for f in proof.feeds]
        return real_prove(reference, quantized, proof, int8)

    monkeypatch.setattr(quantize, "quantize", spy_quantize)
    monkeypatch.setattr(quantize, "prove", spy_prove)
    convert(str(DIGITS), int8=Int8Options(min_top1=0), inputs=[npz])
    assert seen == {"calibration": [0, 1, 2, 3, 5, 6, 7, 8, 10, 11], "verification": [4, 9]}


def test_verify_inputs_prove_instead_of_a_split(tmp_path: Path) -> None:
    held = tmp_path / "held.npz"
    np.savez(held, pixels=digits_pixels()[:7])
    info = convert(str(DIGITS), int8=Int8Options(verify_inputs=(str(held),)), inputs=[SAMPLES]).report.int8
    assert info is not None
    assert (info.calibration_samples, info.verification_samples) == (100, 7)
    assert info.verified_on == f"7 samples from {held}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--int8"], "INT8 needs real samples to calibrate on"),
        (["--int8", "--inputs", str(SAMPLES), "--fp16"], "INT8 quantizes the float32 model"),
        (["--verify-inputs", str(SAMPLES)], "--verify-inputs need --int8"),
        (["--int8", "--random-calibration", "--verify-inputs", str(SAMPLES)], "need calibration samples"),
    ],
)
def test_refused_with_one_line_and_nothing_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "out.onnx"
    assert main(["convert", str(DIGITS), "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnfold: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_an_already_quantized_model_is_refused(tmp_path: Path) -> None:
    quantized = tmp_path / "digits.int8.onnx"
    onnx.save(convert(str(DIGITS), int8=True, inputs=[SAMPLES]).model, str(quantized))
    with pytest.raises(InputError, match=r"the model is already quantized \(int8 QDQ: .*\); INT8 quantization needs"):
        convert(str(quantized), int8=True, inputs=[SAMPLES])


def test_a_quantized_model_that_does_not_run_fails_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(m: ModelProto, feeds: Any, int8: Int8Options) -> ModelProto:
        m.graph.node[0].input[0] = "missing"
        return m

    monkeypatch.setattr(quantize, "quantize", broken)
    out = tmp_path / "out.onnx"
    assert main(["convert", str(DIGITS), "-o", str(out), "--int8", "--inputs", str(SAMPLES)]) == 3
    err = capsys.readouterr().err
    assert "int8 verification FAILED against the float model on 20 samples held out" in err
    assert "bnfold: error: the INT8 model does not run in ONNX Runtime: " in err
    assert not out.exists()


def test_python_refuses_int8_without_samples() -> None:
    with pytest.raises(InputError, match="INT8 needs real samples"):
        convert(str(DIGITS), int8=True)


def test_one_sample_cannot_be_split(tmp_path: Path) -> None:
    npz = tmp_path / "one.npz"
    np.savez(npz, pixels=digits_pixels()[:1])
    with pytest.raises(InputError, match="at least 2 samples"):
        convert(str(DIGITS), int8=True, inputs=[npz])


def test_below_the_thresholds_exits_3_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Calibrated on dim images (pixels x 0.02), verified on real ones: activations clip, predictions change."""
    dim, real = tmp_path / "dim.npz", tmp_path / "real.npz"
    np.savez(dim, pixels=digits_pixels() * np.float32(0.02))
    np.savez(real, pixels=digits_pixels())
    out = tmp_path / "out" / "digits.int8.onnx"
    out.parent.mkdir()
    args = ["convert", str(DIGITS), "-o", str(out), "--int8", "--inputs", str(dim), "--verify-inputs", str(real)]
    assert main(args) == 3
    captured = capsys.readouterr()
    assert "bnfold: error: INT8 verification failed: logits top-1 agreement" in captured.err
    assert "int8 verification FAILED against the float model on 100 samples from" in captured.err
    assert list(out.parent.iterdir()) == []
    # the same calibration passes when the verification samples are as dim (what it was calibrated for)
    assert main([*args[:-1], str(dim), "-q"]) == 0
    assert out.exists()


def test_snr_threshold_for_outputs_that_are_not_class_scores(tmp_path: Path) -> None:
    m, npz = conv_bn_model(tmp_path)
    passed = convert(m, int8=True, inputs=[npz]).report.int8
    assert passed is not None and passed.outputs[0].criterion == "SNR >= 20 dB" and passed.outputs[0].top1 is None
    snr = passed.outputs[0].snr_db
    with pytest.raises(VerificationError, match=r"INT8 verification failed: y SNR .* dB < .* dB") as failed:
        convert(m, int8=Int8Options(min_snr_db=snr + 1), inputs=[npz])
    assert failed.value.report.int8.passed is False  # type: ignore[attr-defined]


def conv_bn_model(tmp_path: Path) -> tuple[ModelProto, Path]:
    """Conv (4 channels, no bias) -> BN whose last channel has a tiny running variance (scale ~30)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    bn = {
        "scale": np.ones(4, np.float32),
        "B": np.zeros(4, np.float32),
        "mean": np.zeros(4, np.float32),
        "var": np.array([1.0, 1.0, 1.0, 1e-3], np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", *(f"bn_{k}" for k in bn)], ["y"], name="bn", epsilon=1e-5),
    ]
    inits = [numpy_helper.from_array(w, "W"), *(numpy_helper.from_array(v, f"bn_{k}") for k, v in bn.items())]
    npz = tmp_path / "x.npz"
    np.savez(npz, x=rng.standard_normal((20, 1, 3, 6, 6)).astype(np.float32))
    return model(nodes, [("x", [1, 3, 6, 6])], ["y"], inits), npz


def test_report_shows_the_fold_widening_a_range(tmp_path: Path) -> None:
    m, npz = conv_bn_model(tmp_path)
    report = convert(m, int8=True, inputs=[npz]).report
    assert report.int8 is not None
    (layer,) = report.int8.layers
    assert layer.layer == "Conv conv" and layer.folded == ["bn"] and layer.channels == 4
    w = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    s = 1 / np.sqrt(np.array([1.0, 1.0, 1.0, 1e-3]) + 1e-5)
    before = np.abs(w).reshape(4, -1).max(axis=1)
    np.testing.assert_allclose(layer.before, before, rtol=1e-6)
    np.testing.assert_allclose(layer.after, before * s, rtol=1e-6)
    assert layer.spread_after is not None and layer.spread_before is not None
    assert layer.spread_after > 10 * layer.spread_before
    # one scale for the tensor now wastes most of int8 on the scaled channel; one per channel does not
    assert layer.snr_tensor_db < layer.snr_tensor_before_db - 10
    assert layer.snr_channel_db > layer.snr_tensor_db + 10
    text = report.to_text()
    assert "int8 weights by folded layer" in text and "Conv conv     4 ch" in text


def test_random_calibration_is_said_loudly() -> None:
    result = convert(str(DIGITS), int8=Int8Options(random_calibration=True, min_top1=0))
    info = result.report.int8
    assert info is not None and info.random and info.calibrated_on == "8 seeded random inputs (seeds 0-7)"
    lines = result.report.to_text().splitlines()
    warnings = [
        i for i, line in enumerate(lines) if line.startswith("WARNING: calibrated and verified on seeded RANDOM")
    ]
    assert len(warnings) == 2 and warnings[-1] == len(lines) - 2  # before the int8 lines and last but the time
    assert "smoke test only" in metadata(result.model)[quantize.METADATA_KEY]


def test_no_verify_quantizes_without_the_proof(tmp_path: Path) -> None:
    result = convert(str(DIGITS), int8=True, inputs=[SAMPLES], verify=False)
    info = result.report.int8
    assert info is not None and info.passed is None and info.outputs == []
    assert "int8 verification skipped" in result.report.to_text()


def test_int8_options_are_checked() -> None:
    with pytest.raises(InputError, match="activations must be one of uint8, int8"):
        Int8Options(activations="int4")
    with pytest.raises(InputError, match="calibration must be one of"):
        Int8Options(calibration="mse")
    with pytest.raises(InputError, match="min_top1 must be between 0 and 1"):
        Int8Options(min_top1=99)
    with pytest.raises(InputError, match="int8 must be True, False or Int8Options"):
        convert(str(DIGITS), int8="yes", inputs=[SAMPLES])  # type: ignore[arg-type]


@pytest.mark.parametrize(("activations", "calibration"), [("int8", "minmax"), ("uint8", "percentile")])
def test_activation_type_and_calibration_method(activations: str, calibration: str) -> None:
    options = Int8Options(activations=activations, calibration=calibration)
    result = convert(str(DIGITS), int8=options, inputs=[SAMPLES])
    quantized = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    zero_point = {t.name: t for t in result.model.graph.initializer}[quantized[0].input[2]]
    assert zero_point.data_type == (onnx.TensorProto.INT8 if activations == "int8" else onnx.TensorProto.UINT8)
    assert f"calibration {calibration}" in metadata(result.model)[quantize.METADATA_KEY]


def test_snr_and_quality_closed_forms() -> None:
    want = np.array([3.0, 4.0])
    assert snr_db(want + np.array([0.3, 0.4]), want) == pytest.approx(20.0)
    assert snr_db(want, want) == float("inf")
    rows = np.array([[1.0, 0.5, -0.25], [0.01, 0.003, -0.007]])
    assert int8_snr_db(rows, per_channel=True) > int8_snr_db(rows, per_channel=False)
    scores = [np.array([[0.1, 0.9]]), np.array([[0.8, 0.2]])]
    flipped = [np.array([[0.9, 0.1]]), np.array([[0.8, 0.2]])]
    quality = output_quality("p", flipped, scores, min_top1=0.99, min_snr_db=0)
    assert (quality.top1, quality.passed, quality.criterion) == (0.5, False, "top-1 agreement >= 99%")
    nan = output_quality("y", [np.array([[np.nan]])], [np.array([[1.0]])], min_top1=0, min_snr_db=-100)
    assert nan.nonfinite == 1 and not nan.passed
