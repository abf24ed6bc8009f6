"""The bundled default model ``digits``: numpy oracle vs ONNX Runtime, folding, stated accuracy, reproducibility."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray

from converter import convert
from examples.digits import model as digits
from examples.digits.data import Split, load_split
from examples.digits.export import IR_VERSION, OPSET, correct, from_onnx, run_onnx, to_onnx
from examples.digits.train import Hyper, train

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "service" / "models" / "digits" / "1" / "model.onnx"
CONFIG = ROOT / "service" / "models" / "digits" / "config.json"
SERVING_DOC = ROOT / "docs" / "serving.md"  # "The bundled model: digits"
# float32 inference vs the float64 numpy oracle: max|Δ| within this fraction of the largest |logit|
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def split() -> Split:
    return load_split()


@pytest.fixture(scope="module")
def shipped() -> onnx.ModelProto:
    return onnx.load(MODEL)


@pytest.fixture(scope="module")
def pixels(split: Split) -> NDArray[np.float64]:
    """Every image of the data set, training and held-out."""
    return np.concatenate([split.x_train, split.x_test])


def _assert_close(actual: NDArray[np.floating], expected: NDArray[np.floating]) -> None:
    scale = float(np.abs(expected).max())
    err = float(np.abs(np.asarray(actual, np.float64) - expected).max())
    assert err <= REL_TOL * scale, f"max|Δ| {err:.3g} > {REL_TOL:g}·{scale:.3g}"


def test_shipped_model_layout(shipped: onnx.ModelProto) -> None:
    onnx.checker.check_model(shipped, full_check=True)
    assert shipped.ir_version <= 10
    assert [(o.domain, o.version) for o in shipped.opset_import] == [("", OPSET)]
    assert shipped.ir_version == IR_VERSION
    (inp,), (out,) = shipped.graph.input, shipped.graph.output
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 1, 8, 8]
    assert out.name == "logits" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 10]
    assert [(n.op_type, n.name) for n in shipped.graph.node] == [
        ("Mul", "scale"),
        ("Conv", "conv1"),
        ("BatchNormalization", "bn1"),
        ("Relu", "relu1"),
        ("Conv", "conv2"),
        ("BatchNormalization", "bn2"),
        ("Relu", "relu2"),
        ("Flatten", "flatten"),
        ("Gemm", "fc1"),
        ("BatchNormalization", "bn3"),
        ("Relu", "relu3"),
        ("Gemm", "fc2"),
    ]
    for node in shipped.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "BatchNormalization":
            assert attrs["training_mode"] == 0
            assert attrs["epsilon"] == pytest.approx(digits.EPS, rel=1e-6)
        if node.op_type == "Gemm":
            assert attrs["transB"] == 1
    assert MODEL.stat().st_size < 100_000


def test_config() -> None:
    assert json.loads(CONFIG.read_text()) == {
        "max_batch_size": 1,
        "labels": {"logits": [str(d) for d in range(10)]},
        "scale": 16,  # the web page draws ink as 0..1; the model takes 0..16
    }


def test_shipped_model_is_what_export_writes(shipped: onnx.ModelProto) -> None:
    """from_onnx → to_onnx gives back the shipped file byte for byte: the exporter made it."""
    assert to_onnx(from_onnx(shipped)).SerializeToString() == MODEL.read_bytes()


def test_numpy_oracle_equals_onnx_before_folding(shipped: onnx.ModelProto, pixels: NDArray[np.float64]) -> None:
    expected = digits.forward(from_onnx(shipped), pixels)
    _assert_close(run_onnx(shipped, pixels), expected)


def test_numpy_oracle_equals_onnx_after_folding(shipped: onnx.ModelProto, pixels: NDArray[np.float64]) -> None:
    folded = convert(shipped).model
    expected = digits.forward(from_onnx(shipped), pixels)
    _assert_close(run_onnx(folded, pixels), expected)


def test_every_batchnorm_is_folded(shipped: onnx.ModelProto) -> None:
    result = convert(shipped)
    report = result.report
    assert report.kept == []
    assert {r.name: r.into for r in report.folded} == {"bn1": "Conv conv1", "bn2": "Conv conv2", "bn3": "Gemm fc1"}
    assert not [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    assert report.after is not None and report.after.batchnorms == 0
    assert report.verification is not None and report.verification.passed


def test_the_docs_state_the_shipped_accuracy(shipped: onnx.ModelProto, split: Split) -> None:
    text = SERVING_DOC.read_text()
    found = re.search(r"^Held-out accuracy: (\d+\.\d\d)% \((\d+)/(\d+) digits", text, re.MULTILINE)
    assert found, "docs/serving.md lacks the 'Held-out accuracy: ...' line"
    percent, count, total = found.group(1), int(found.group(2)), int(found.group(3))
    logits = run_onnx(shipped, split.x_test)
    assert total == len(split.y_test) == 450
    assert count == correct(logits, split.y_test)
    assert percent == f"{100 * count / total:.2f}"
    folded = run_onnx(convert(shipped).model, split.x_test)
    assert np.array_equal(np.argmax(folded, axis=1), np.argmax(logits, axis=1))


def test_training_is_reproducible(split: Split) -> None:
    x, y = split.x_train[:320], split.y_train[:320]
    hyper = Hyper(epochs=2)
    first, second = train(x, y, seed=7, hyper=hyper), train(x, y, seed=7, hyper=hyper)
    other = train(x, y, seed=8, hyper=hyper)
    for name, value in first.trainable().items():
        assert np.array_equal(value, second.trainable()[name]), name
    for name in digits.BATCHNORMS:
        a, b = getattr(first, name), getattr(second, name)
        assert np.array_equal(a.running_mean, b.running_mean) and np.array_equal(a.running_var, b.running_var)
        assert not np.array_equal(a.running_mean, np.zeros_like(a.running_mean))  # the running stats did move
    assert not np.array_equal(first.conv1, other.conv1)


def test_backward_matches_finite_differences() -> None:
    """The im2col convolution gradients and the network around reference.train_backward are right."""
    rng = np.random.default_rng(3)
    p = digits.init_params(rng)
    x = rng.integers(0, 17, size=(5, 1, 8, 8)).astype(np.float64)
    y = rng.integers(0, 10, size=5)

    def loss(q: digits.Params) -> float:
        return digits.softmax_cross_entropy(digits.forward_train(q, x)[0], y)[0]

    logits, _, cache = digits.forward_train(p, x)
    grads = digits.backward(p, cache, digits.softmax_cross_entropy(logits, y)[1])
    values = p.trainable()
    h = 1e-6
    for name, value in values.items():
        for _ in range(3):
            idx = tuple(int(rng.integers(0, s)) for s in value.shape)
            plus, minus = value.copy(), value.copy()
            plus[idx] += h
            minus[idx] -= h
            numeric = loss(p.with_trainable({**values, name: plus})) - loss(p.with_trainable({**values, name: minus}))
            assert numeric / (2 * h) == pytest.approx(grads[name][idx], rel=1e-4, abs=1e-8), (name, idx)
