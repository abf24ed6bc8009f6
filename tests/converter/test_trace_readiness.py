"""The first diverging node on a deliberately corrupted fold, and the deployment-readiness numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import helper, numpy_helper

import converter.rewrite
from converter import VerificationError, convert, inspect_model
from converter.cli import main
from converter.folding import cast_exact
from converter.readiness import fp16_counts
from converter.reference import BatchNormParams
from tests.converter.graphs import bn_initializers, bn_node, model

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "service" / "models" / "digits" / "1" / "model.onnx"
SAMPLES = ROOT / "service" / "models" / "digits" / "samples.npz"


def corrupt(target: str) -> Any:
    """A cast that gets the fold into layer ``target`` wrong by 1% (any other fold is exact)."""

    def cast(value: NDArray[np.float64], dtype: Any, what: str) -> NDArray[np.floating]:
        return cast_exact(value * 1.01 if what == target else value, dtype, what)

    return cast


@pytest.mark.parametrize(("bn", "into"), [("bn2", "Conv conv2"), ("bn3", "Gemm fc1")])
def test_corrupted_fold_is_localised(
    bn: str, into: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(converter.rewrite, "cast_exact", corrupt(into.split()[1]))
    out = tmp_path / "out.onnx"
    assert main(["convert", str(DIGITS), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert f"first diverging node {bn} ({bn} folded into {into})" in err.splitlines()[-1]
    assert f"trace: first diverging node {bn} (BatchNormalization)" in err
    assert main(["inspect", str(DIGITS), "--trace", "--json"]) == 3  # inspect verifies in memory with --trace
    divergence = json.loads(capsys.readouterr().out)["trace"]["divergence"]
    assert (divergence["node"], divergence["layer"], divergence["fold"]) == (bn, bn, f"folded into {into}")
    assert not out.exists()


def test_trace_on_the_failing_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(converter.rewrite, "cast_exact", corrupt("conv1"))
    with pytest.raises(VerificationError) as caught:
        convert(DIGITS, inputs=[SAMPLES], random=False)
    report = caught.value.report
    assert report.trace.inputs_from.startswith("sample 0 of 100 samples")  # type: ignore[attr-defined]
    assert report.trace.divergence.layer == "bn1"  # type: ignore[attr-defined]


def test_trace_when_asked_and_nothing_diverges() -> None:
    report = convert(DIGITS, trace=True).report
    assert report.trace is not None and report.trace.divergence is None
    assert report.trace.compared >= 6  # every activation the two graphs share
    assert "trace: the" in report.to_text()


def crafted(gamma: list[float], var: list[float]) -> onnx.ModelProto:
    """Conv with all-ones 1x1 weights, then a BN whose γ sets W′ = γ/sqrt(var + ε) per channel."""
    c = len(gamma)
    p = BatchNormParams(
        gamma=np.array(gamma), beta=np.zeros(c), running_mean=np.zeros(c), running_var=np.array(var), eps=1e-5
    )
    w = numpy_helper.from_array(np.ones((c, 1, 1, 1), np.float32), "W")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    return model(nodes, [("x", [1, 1, 2, 2])], ["y"], [w, *bn_initializers(p)])


def naive_fp16_counts(values: NDArray[np.float64]) -> tuple[int, int, int]:
    with np.errstate(over="ignore"):
        h = np.abs(values.astype(np.float32).astype(np.float16).astype(np.float64))
    finite = np.isfinite(values)
    return (
        int(np.count_nonzero(np.isinf(h) & finite)),
        int(np.count_nonzero((h > 0) & (h < 2.0**-14))),
        int(np.count_nonzero((h == 0) & (values != 0))),
    )


def test_fp16_thresholds_agree_with_rounding() -> None:
    rng = np.random.default_rng(0)
    edges = np.array([65504, 65519.99, 65520, 65536, 2.0**-25, 2.0**-25 * 1.0001, 2.0**-14 - 2.0**-25, 2.0**-14])
    values = np.concatenate([rng.standard_normal(3 << 20) * 10.0 ** rng.integers(-9, 6, 3 << 20), edges, -edges])
    assert fp16_counts(values) == naive_fp16_counts(values)
    assert all(fp16_counts(values)), fp16_counts(values)  # every kind occurs, across several chunks


def test_fp16_counts_on_a_crafted_layer() -> None:
    assert fp16_counts(np.array([1e5, -7e4, 1e-6, 3e-5, 1e-9, 0.0, 1.0])) == (2, 2, 1)
    m = crafted([1e5, 1e-6, 1e-9, 1.0], [1.0, 1.0, 1.0, 0.0])
    report = inspect_model(m)
    (layer,) = report.folded
    assert layer.weights is not None
    w = layer.weights
    assert (w.fp16_overflow, w.fp16_subnormal, w.fp16_zero) == (1, 1, 1)
    assert w.max_weight == pytest.approx(1e5 / np.sqrt(1 + 1e-5), rel=1e-6)
    # per channel max|W′| = 1e5, 1e-6, 1e-9, 1/sqrt(1e-5) ≈ 316; median ≈ 158
    assert w.channel_spread == pytest.approx(1e5 / np.sqrt(1 + 1e-5) / (0.5 / np.sqrt(1e-5) + 0.5e-6), rel=1e-4)
    assert w.channel_spread_before == 1.0
    assert layer.near_zero_variance == 1
    text = report.to_text()
    assert "float16 (if converted later): folded values that overflow 1, become subnormal 1, flush to zero 1" in text
    assert "running variance <= epsilon" in text


def test_fp16_counts_under_fp16() -> None:
    m = crafted([1e-6, 1e-9, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0])
    report = convert(m, fp16=True).report
    assert report.readiness is not None and report.readiness.fp16
    assert (report.readiness.fp16_overflow, report.readiness.fp16_subnormal, report.readiness.fp16_zero) == (0, 1, 1)
    assert report.readiness.warnings[0].startswith("float16: ")
    data = json.loads(report.to_json())
    assert data["layers"][0]["weights"]["fp16_subnormal"] == 1


def test_readiness_is_in_every_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(DIGITS), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["readiness"]["max_weight"] > 0 and data["readiness"]["widest_spread"] >= 1
    assert {layer["name"] for layer in data["layers"] if layer["weights"]} == {"bn1", "bn2", "bn3"}
