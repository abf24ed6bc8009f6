"""``benchmarks.fold_coverage --files``: the per-model comparison on given ONNX files, their dynamic dims from
``PATH=DIMS`` for bnfold's verification and for the error inputs alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import fold_coverage


def conv_bn_dynamic(path: Path) -> Path:
    """Conv(3→4, 3x3) → BatchNorm on an input of shape (N, 3, H, W), every dim but the channels dynamic."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "var"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn"),
        ],
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "oh", "ow"])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_given_file_runs_at_the_given_shape(tmp_path: Path) -> None:
    model = conv_bn_dynamic(tmp_path / "conv_bn.onnx")
    out = tmp_path / "real.json"
    assert fold_coverage.main(["--files", f"{model}=1,3,9,7", "--inputs", "1", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["model"], row["input_shape"], row["exit"]) == ("conv_bn", "1,3,9,7", 0)
    assert (row["bn_before"], row["bnfold"]) == (1, 0)
    assert row["producer"].endswith("opset 13, IR " + str(onnx.load(str(model)).ir_version))
    assert row["vs_original"] < 1e-5


def test_given_file_shape_reaches_the_error_inputs(tmp_path: Path) -> None:
    model = onnx.load(str(conv_bn_dynamic(tmp_path / "conv_bn.onnx")))
    x = fold_coverage.feeds(model, np.random.default_rng(0), "2,3,9,7")
    assert x["x"].shape == (2, 3, 9, 7)
    assert fold_coverage.feeds(model, np.random.default_rng(0))["x"].shape == (1, 3, 1, 1)


def test_path_without_dims_keeps_its_equals_sign() -> None:
    ((name, _, path, shape),) = fold_coverage.given_files(["runs/a=b.onnx"])
    assert (name, path, shape) == ("a=b", Path("runs/a=b.onnx"), None)
