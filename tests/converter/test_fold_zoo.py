"""The zoo of patterns only bnfold folds: each rule folds its case, each negative twin keeps its BatchNorm with the
reason, and ONNX Runtime gives the original's outputs to float32 precision (max rel error <= 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest

from converter import convert, zoo
from tests.converter.graphs import op_types, run

REASONS = {
    "padded_next_conv": ["forward into Conv", "pads with zeros (pads [1, 1, 1, 1])", "0 instead of the shift"],
    "two_readers": [
        "its input comes from Relu",
        "forward: its output has 2 readers, not one (Conv conv1, Conv conv2)",
        "the output of Conv conv3 has other readers",
    ],
    "relu_between": ["its input comes from Relu relu0"],
    "concat_spatial_axis": ["Concat concat0 on axis 2, not the channel axis 1"],
    "reshape_mixes_channels": ["does not keep the channel axis: 4 channels × 6 inner elements in, 4 × 3"],
}


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("case", zoo.FOLD_CASES, ids=lambda c: c.name)
def test_each_rule_folds_its_case_and_each_twin_keeps_its_batchnorm(case: zoo.FoldCase) -> None:
    original = case.build()
    result = convert(original)  # verification on, default float32 tolerance
    folded = [r for r in result.report.layers if r.action == "folded"]
    kept = [r for r in result.report.layers if r.action == "kept"]
    assert tuple(str(r.fold) for r in folded) == case.kinds, result.report.to_text()
    assert len(kept) == case.kept, result.report.to_text()
    assert op_types(result.model).count("BatchNormalization") == case.kept
    reasons = " | ".join(str(r.reason) for r in kept)
    for part in REASONS.get(case.name, []):
        assert part in reasons, reasons
    rng = np.random.default_rng(0)
    (inp,) = original.graph.input
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    for _ in range(3):
        x = rng.normal(size=shape).astype(np.float32)
        before, after = run(original, {inp.name: x})[0], run(result.model, {inp.name: x})[0]
        assert max_rel(after, before) <= 1e-6


def test_report_json_names_the_rule_per_batchnorm() -> None:
    import json

    report = json.loads(convert(zoo.inception_concat()).report.to_json())
    (layer,) = report["layers"]
    assert layer["fold"] == "concat split"
    assert layer["into"] == "Conv conv0 + Conv conv1 + Conv conv2 (split at Concat concat0)"
    text = convert(zoo.crnn_squeeze()).report.to_text()
    assert "into Conv conv0 through Squeeze squeeze0 [through shape op]" in text


def test_dead_constant_expressions_are_pruned() -> None:
    result = convert(zoo.weight_expression())
    ops = op_types(result.model)
    assert not {"Constant", "Cast", "Reshape", "Slice", "Concat", "Transpose"} & set(ops), ops
    linear = convert(zoo.linear_bn())
    assert op_types(linear.model) == ["MatMul", "Add", "Relu", "Identity"]  # Identity: the named output


def test_text_report_marks_rules_other_than_backward() -> None:
    text = convert(zoo.upsample_decoder()).report.to_text()
    assert "  bn0  folded  into ConvTranspose convtranspose0\n" in text  # backward: plain, as always
    assert "  bn1  folded  into ConvTranspose convtranspose1 [forward]\n" in text
    layers = convert(zoo.upsample_decoder()).report.to_dict()["layers"]
    assert [layer["fold"] for layer in layers] == ["backward", "forward"]


def test_affine_mode_rewrites_what_forward_folding_refuses() -> None:
    m = zoo.padded_next_conv()
    result = convert(m, bn="affine")
    assert [r.action for r in result.report.layers] == ["affine"]
    assert "BatchNormalization" not in op_types(result.model)
