"""TensorFlow/Keras coverage: per layer case, BN left by tf2onnx alone vs after bnfold, error vs TensorFlow.

    python -m benchmarks.tf_coverage [--out benchmarks/results/tf_coverage.json]   # needs the tensorflow extra

For each case of :mod:`examples.tensorflow.cases` (plus the fine-tuned model with a frozen BN and a
hand-written BN), it counts BatchNormalization nodes and constant Mul→Add pairs
(:func:`converter.frontends.tensorflow.affine_pairs`) in (a) tf2onnx's default conversion
(``tf2onnx.convert.from_function``, its grappler and ONNX optimizers on) and (b) bnfold's output, and reports
bnfold's max relative error against TensorFlow (``training=False``) and tf2onnx default's, both on the same
seeded input of batch 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.environment import emit, git_state, host


def _ort(model: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tf_coverage.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf2onnx

    from converter import convert_keras
    from converter.frontends import tensorflow as tf_frontend
    from converter.frontends.tensorflow import _quiet
    from examples.tensorflow import cases, manual_bn

    models: list[tuple[str, Any, Any]] = [(name, cases.build(name), None) for name in cases.CASES]
    models.append(("frozen BN, fine-tuned", cases.fine_tuned()[0], None))
    net, _ = manual_bn.train(15)
    spec = tf.TensorSpec([None, manual_bn.SIZE, manual_bn.SIZE, 1], tf.float32, name="image")
    models.append(("hand-written BN", net, spec))
    fused_spec = tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")
    models.append(("FusedBatchNormV3 (TF1)", cases.FusedBatchNormNet(), fused_spec))
    rows = []
    for name, model, signature in models:
        specs = [signature] if signature is not None else [tf.TensorSpec(model.inputs[0].shape, tf.float32, name="x")]
        x = np.random.default_rng(5).standard_normal((2, *specs[0].shape[1:])).astype(np.float32)
        if signature is None:
            fn = tf.function(lambda t, m=model: m(t, training=False))
        else:
            fn = tf.function(lambda t, m=model: m(t, is_training=False))
        try:
            want = np.asarray(fn(tf.constant(x)))
        except tf.errors.UnimplementedError:
            want = np.asarray(tf.function(fn, jit_compile=True)(tf.constant(x)))
        with _quiet():
            default, _ = tf2onnx.convert.from_function(
                tf.function(fn, input_signature=specs), input_signature=specs, opset=17
            )
        left_default = tf_frontend.affine_pairs(default)
        err_default = float(np.abs(_ort(default, x) - want).max() / np.abs(want).max())
        if signature is None:
            result = convert_keras(model)
        else:
            result = convert_keras(_KerasLike(model), signature)
        before = _raw_export(result)
        after = tf_frontend.affine_pairs(result.model)
        err = float(np.abs(_ort(result.model, x) - want).max() / np.abs(want).max())
        rows.append(
            {
                "case": name,
                "tf2onnx_default_left": left_default,
                "tf2onnx_default_max_rel": err_default,
                "export_bn_maps": before,
                "bnfold_left": after,
                "bnfold_max_rel": err,
                "folded": sum(layer.action == "folded" for layer in result.report.layers),
            }
        )
    header = (
        f"{'case':<24} {'tf2onnx default left':>21} {'its err':>9} {'bnfold export':>14} {'folded':>6} "
        f"{'bnfold left':>12} {'err vs TF':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:

        def fmt(c: dict[str, int]) -> str:
            return f"{c['batchnorm']} BN/{c['mul_add']} M+A"

        lines.append(
            f"{r['case']:<24} {fmt(r['tf2onnx_default_left']):>21} {r['tf2onnx_default_max_rel']:>9.1e} "
            f"{fmt(r['export_bn_maps']):>14} {r['folded']:>6} {fmt(r['bnfold_left']):>12} {r['bnfold_max_rel']:>9.1e}"
        )
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}
    result_json = {"host": host(), "git": git_state("converter", "examples/tensorflow"), "versions": versions}
    result_json["rows"] = rows
    emit(result_json, "\n".join(lines) + f"\n{versions}", args.out)
    return 0


class _KerasLike:
    """The hand-written BN's tf.Module called like a Keras model (``training=`` → ``is_training=``)."""

    def __init__(self, net: Any) -> None:
        self.net = net

    def __call__(self, x: Any, training: bool = False) -> Any:
        return self.net(x, is_training=training)


def _raw_export(result: Any) -> Any:
    """BN maps as bnfold's export left them: the report's before-counts are node totals, so count the layers."""
    folded = [layer for layer in result.report.layers if layer.kind in ("Mul+Add", "Mul", "BatchNormalization")]
    return {
        "batchnorm": sum(layer.kind == "BatchNormalization" for layer in folded),
        "mul_add": sum(layer.kind != "BatchNormalization" for layer in folded),
    }


if __name__ == "__main__":
    raise SystemExit(main())
