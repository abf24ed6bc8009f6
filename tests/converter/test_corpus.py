"""Every model of the corpus of odd exports (:mod:`benchmarks.corpus`), converted by the command line: exit 0, the
BatchNorms before and left as recorded, outputs within 1e-5 of the original's magnitude (the float16 model: within
its own precision), and ``bnfold inspect`` reporting exactly what ``bnfold convert`` did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import ModelProto, helper

from benchmarks import corpus
from converter.cli import main
from converter.graph import nested_nodes

#: name → (BatchNorms before, BatchNorms left by bnfold), If/Loop bodies included.
EXPECTED = {
    "torch_opset9_inputs": (4, 0),
    "torch_opset11_inputs": (4, 0),
    "torch_opset13_inputs": (4, 0),
    "torch_opset17_inputs": (4, 0),
    "torch_resnet_opset9_inputs": (15, 0),
    "torch_dynamo": (4, 0),
    "unsorted_nodes": (4, 0),
    "ir3_tile_expand": (2, 0),
    "caffe2_constant_of_shape": (1, 0),
    "opset11_range_tile": (1, 0),
    "constant_identity_cast": (1, 0),
    "quantized_unsorted": (1, 0),
    "spatial_opset7": (1, 0),
    "external_data": (2, 0),
    "if_branches": (2, 0),
    "loop_body": (1, 0),
    "fp16": (2, 0),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return corpus.build(tmp_path_factory.mktemp("corpus"))


def count_bn(m: ModelProto) -> int:
    return sum(1 for n in [*m.graph.node, *nested_nodes(m.graph)] if n.op_type == "BatchNormalization")


def outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o, np.float64) for o in sess.run(None, {k: v for k, v in feeds.items()})]


def random_feeds(m: ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[vi.name] = (
            np.asarray(rng.random(shape) < 0.5) if dtype == np.bool_ else rng.normal(size=shape).astype(dtype)
        )
    return feeds


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What a conversion did, without timings, outputs or verification."""
    layers = [(r["name"], r["action"], r["into"], r["reason"], r["fold"]) for r in report["layers"]]
    notes = [n for n in report["notes"] if not n.startswith("inspect:")]
    return {"layers": layers, "after": report["after"], "inputs": report["initializer_inputs"], "notes": notes}


def test_every_case_has_a_recorded_expectation() -> None:
    assert {c.name for c in corpus.CASES} == set(EXPECTED)


@pytest.mark.parametrize("name", [c.name for c in corpus.cases()])
def test_corpus_model_folds_as_recorded_exactly_and_inspect_agrees(
    name: str, built: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst, report_path = built[name], tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["convert", str(src), "-o", str(dst), "-q", "--report", str(report_path)]) == 0
    before, left = EXPECTED[name]
    original = onnx.load(str(src), load_external_data=False)
    assert (count_bn(original), count_bn(onnx.load(str(dst)))) == (before, left)
    onnx.checker.check_model(str(dst))  # sorted, consistent: even where the original was not

    fp16 = original.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    rtol = 2e-3 if fp16 else 1e-5  # float16 keeps 11 significant bits: the fold is rounded once, like any weight
    for seed in range(3):
        feeds = random_feeds(original, seed)
        for want, got in zip(outputs(src, feeds), outputs(dst, feeds), strict=True):
            assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want)), name

    report = json.loads(report_path.read_text())
    capsys.readouterr()
    assert main(["inspect", str(src), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert summary(inspected) == summary(report)
