"""Keras models in: every layer kind that carries BN folds to zero BN, equal to TensorFlow within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import onnxruntime as ort  # noqa: E402

from converter import convert_keras  # noqa: E402
from converter.errors import VerificationError  # noqa: E402
from converter.frontends import tensorflow as tf_frontend  # noqa: E402
from examples.tensorflow import cases  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def run_onnx(model: object, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])  # type: ignore[attr-defined]
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def tf_inference(model: object, x: np.ndarray) -> np.ndarray:
    try:
        return np.asarray(model(x, training=False))  # type: ignore[operator]
    except tf.errors.UnimplementedError:  # channels_first Conv on CPU: TensorFlow needs XLA
        return np.asarray(tf.function(lambda t: model(t, training=False), jit_compile=True)(tf.constant(x)))  # type: ignore[operator]


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_layer_folds_to_zero_bn(name: str) -> None:
    model = cases.build(name)
    result = convert_keras(model)
    report = result.report
    assert tf_frontend.affine_pairs(result.model) == {"batchnorm": 0, "mul_add": 0}
    folded = [layer for layer in report.layers if layer.action == "folded"]
    bns = sum(isinstance(layer, cases.L.BatchNormalization) for layer in model.layers)
    assert len(folded) >= bns, [(layer.name, layer.reason) for layer in report.layers]
    tf_check = report.extra_verifications[0]
    assert tf_check.reference.startswith("TensorFlow inference (training=False)")
    assert tf_check.passed and max(o.max_rel for o in tf_check.outputs) <= 1e-5
    assert any("tf2onnx" in note and "opset 17" in note for note in report.notes)
    # independently: a batch of 3 (the export keeps the batch dim dynamic), against TensorFlow itself
    x = np.random.default_rng(7).standard_normal((3, *model.inputs[0].shape[1:])).astype(np.float32)
    want = tf_inference(model, x)
    got = run_onnx(result.model, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_frozen_bn_in_fine_tuned_model() -> None:
    model, frozen = cases.fine_tuned(steps=2)
    base_bn = model.layers[0].layers[1]
    for before, after in zip(frozen, base_bn.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # the frozen BN kept its statistics while the head trained
    result = convert_keras(model)
    assert tf_frontend.affine_pairs(result.model) == {"batchnorm": 0, "mul_add": 0}
    assert result.report.extra_verifications[0].passed
    x = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype(np.float32)
    want = np.asarray(model(x, training=False))
    assert np.abs(run_onnx(result.model, x) - want).max() <= 1e-5 * np.abs(want).max()


def test_bn_mode_keep_leaves_the_mul_add() -> None:
    result = convert_keras(cases.build("Conv2D use_bias=False"), bn="keep")
    assert tf_frontend.affine_pairs(result.model)["mul_add"] == 1
    assert result.report.extra_verifications[0].passed


def test_tensorflow_comparison_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted model that differs from TensorFlow (here: TensorFlow's outputs nudged by 1e-3) is refused."""
    real = tf_frontend._run

    def nudged(*args: object, **kwargs: object) -> tuple[list[np.ndarray], str]:
        outputs, how = real(*args, **kwargs)  # type: ignore[arg-type]
        return [o + np.float32(1e-3) * np.abs(o).max() for o in outputs], how

    monkeypatch.setattr(tf_frontend, "_run", nudged)
    with pytest.raises(VerificationError, match="against TensorFlow failed"):
        convert_keras(cases.build("Dense"))


def test_explicit_signature_names_the_input() -> None:
    model = cases.build("Dense")
    result = convert_keras(model, tf.TensorSpec([None, 6], tf.float32, name="features"), input_shapes=[4, 6])
    assert [i.name for i in result.model.graph.input] == ["features"]
    assert [o.name for o in result.model.graph.output] == ["output"]
    assert result.report.extra_verifications[0].inputs == {"features": [4, 6]}
