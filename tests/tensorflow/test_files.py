"""`bnfold convert` on .keras, .h5 and SavedModel inputs; refusals of unsafe ones; a hand-written BN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
import keras  # noqa: E402

from converter import cli  # noqa: E402
from converter.frontends import tensorflow as tf_frontend  # noqa: E402
from examples.tensorflow import cases, manual_bn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model() -> object:
    return cases.build("Conv2D use_bias=False")


def convert(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["convert", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("fmt", ["keras", "h5", "savedmodel"])
def test_file_formats(fmt: str, model: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / ("model" if fmt == "savedmodel" else f"model.{fmt}")
    if fmt == "savedmodel":
        model.export(str(src), verbose=False)  # type: ignore[attr-defined]
    else:
        model.save(str(src))  # type: ignore[attr-defined]
    out = tmp_path / "out.onnx"
    code, text, err = convert(capsys, str(src), "-o", str(out), "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "verification passed against TensorFlow inference (training=False)" in text
    assert tf_frontend.affine_pairs(onnx.load(str(out))) == {"batchnorm": 0, "mul_add": 0}
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["action"] for layer in report["layers"]] == ["folded"]


def test_lambda_layer_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Lambda(lambda t: t * 2)])
    for name in ("lambda.keras", "lambda.h5"):
        m.save(str(tmp_path / name))
        code, _, err = convert(capsys, str(tmp_path / name), "-o", str(tmp_path / "x.onnx"))
        assert code == 2
        assert err.count("\n") == 1 and "Lambda layer" in err, err
    assert not (tmp_path / "x.onnx").exists()


def test_weights_only_h5_refused(model: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.weights.h5"
    model.save_weights(str(path))  # type: ignore[attr-defined]
    code, _, err = convert(capsys, str(path), "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and "weights only" in err


def test_saved_model_reading_files_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class Reader(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            size = tf.strings.length(tf.io.read_file("/etc/hostname"))
            return {"y": x * tf.cast(size, tf.float32)}

    module = Reader()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    code, _, err = convert(capsys, str(tmp_path / "sm"), "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and "ReadFile" in err and err.count("\n") == 1


def test_seed_hand_written_batchnorm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-written BN (moments, moving averages with momentum, is_training, tf.nn.batch_normalization), trained,
    saved, converted from its inference branch: no BN left, equal to TensorFlow's inference output."""
    net, _ = manual_bn.train(steps=15)
    assert float(np.abs(net.bn1.moving_mean.numpy()).max()) > 0  # training moved the running statistics
    manual_bn.save(net, tmp_path / "manual_bn")
    out = tmp_path / "manual_bn.onnx"
    code, text, err = convert(capsys, str(tmp_path / "manual_bn"), "-o", str(out), "--input-shape", "2,12,12,1")
    assert code == 0, err
    assert "verification passed against TensorFlow inference" in text
    folded = onnx.load(str(out))
    assert tf_frontend.affine_pairs(folded) == {"batchnorm": 0, "mul_add": 0}
    assert not any(n.op_type in ("Sqrt", "Reciprocal", "Sub") for n in folded.graph.node)
    import onnxruntime as ort

    images, _ = manual_bn.make_bars(5, np.random.default_rng(9))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": images})[0]
    want = manual_bn.inference(net, images)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_fused_batchnorm_savedmodel(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """FusedBatchNormV3 (TF-Keras 2, tf.compat.v1) reaches ONNX as a BatchNormalization node between layout
    Transposes; tf2onnx's own Conv+BN fusion is off, the Transposes cancel, and bnfold folds it."""
    from tf2onnx.optimizer import back_to_back_optimizer

    net = cases.FusedBatchNormNet()
    net.save(str(tmp_path / "fused"))
    out = tmp_path / "fused.onnx"
    code, text, err = convert(capsys, str(tmp_path / "fused"), "-o", str(out))
    assert code == 0, err
    assert "BatchNormalization 1 -> 0" in text
    assert tf_frontend.affine_pairs(onnx.load(str(out))) == {"batchnorm": 0, "mul_add": 0}
    assert ("Conv", "BatchNormalization") in back_to_back_optimizer._func_map  # tf2onnx left as it was


def test_inspect_and_in_place(model: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "model.keras"
    model.save(str(src))  # type: ignore[attr-defined]
    assert cli.main(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["action"] for layer in report["layers"]] == ["folded"]
    assert any("tf2onnx" in note for note in report["notes"])
    code, _, err = convert(capsys, str(src), "--in-place")
    assert code == 2 and "--in-place needs an ONNX input" in err
