"""The BatchNormalization cases that ship with the `onnx` package, through the converter.

The node cases (``collect_testcases``) are built in code by the onnx package; the ``pytorch-converted``
``test_BatchNorm*_eval`` models ship as files (opset 6, upgraded here: ONNX Runtime needs opset 7 or later).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import ModelProto, numpy_helper, version_converter

from converter import ConversionError, convert
from tests.converter.graphs import close, op_types, run

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # some unrelated onnx test cases warn while being generated
    from onnx.backend.test.case.node import collect_testcases

    NODE_CASES = collect_testcases("BatchNormalization")

INFERENCE = [c for c in NODE_CASES if "training" not in c.name]
TRAINING = [c for c in NODE_CASES if "training" in c.name]
PYTORCH_DIR = Path(onnx.__file__).parent / "backend/test/data/pytorch-converted"
PYTORCH = sorted(PYTORCH_DIR.glob("test_BatchNorm*_eval"))


def test_the_cases_are_there() -> None:
    assert {c.name for c in INFERENCE} >= {"test_batchnorm_example", "test_batchnorm_epsilon"}
    assert {c.name for c in TRAINING} >= {"test_batchnorm_example_training_mode"}
    assert len(PYTORCH) >= 5


def _feeds(m: ModelProto, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: v for i, v in zip(m.graph.input, inputs, strict=True)}


def _with_constant_parameters(m: ModelProto, feeds: dict[str, np.ndarray]) -> ModelProto:
    """The same model with every BatchNorm parameter input turned into an initializer."""
    out = ModelProto()
    out.CopyFrom(m)
    bn = out.graph.node[0]
    params = set(bn.input[1:])
    keep = [i for i in out.graph.input if i.name not in params]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    out.graph.initializer.extend(numpy_helper.from_array(feeds[n], n) for n in bn.input[1:])
    return out


@pytest.mark.parametrize("case", INFERENCE, ids=lambda c: c.name)
def test_node_case_passes_in_keep_mode(case: object) -> None:
    for inputs, outputs in case.data_sets:  # type: ignore[attr-defined]
        feeds = _feeds(case.model, inputs)  # type: ignore[attr-defined]
        # every parameter is a graph input: random variances are negative, give NaN, and never pass verification;
        # the case's own data is the check here
        result = convert(case.model, bn="keep", verify=False)  # type: ignore[attr-defined]
        got = run(result.model, feeds)
        for g, want in zip(got, outputs, strict=True):
            assert close(g, want), np.max(np.abs(g - want))


@pytest.mark.parametrize("case", INFERENCE, ids=lambda c: c.name)
def test_node_case_with_constant_parameters_becomes_exact_mul_add(case: object) -> None:
    for inputs, outputs in case.data_sets:  # type: ignore[attr-defined]
        feeds = _feeds(case.model, inputs)  # type: ignore[attr-defined]
        m = _with_constant_parameters(case.model, feeds)  # type: ignore[attr-defined]
        x = {m.graph.input[0].name: feeds[m.graph.input[0].name]}
        result = convert(m, bn="affine")
        assert op_types(result.model) == ["Mul", "Add"]
        assert close(run(result.model, x)[0], outputs[0])


@pytest.mark.parametrize("case", TRAINING, ids=lambda c: c.name)
def test_training_node_case_is_refused_because_its_statistics_are_outputs(case: object) -> None:
    with pytest.raises(ConversionError, match="training mode"):
        convert(case.model, bn="keep", verify=False)  # type: ignore[attr-defined]


@pytest.mark.parametrize("case_dir", PYTORCH, ids=lambda p: p.name)
@pytest.mark.parametrize("mode", ["keep", "affine"])
def test_pytorch_converted_eval_case(case_dir: Path, mode: str) -> None:
    m = version_converter.convert_version(onnx.load(str(case_dir / "model.onnx")), 15)
    x = numpy_helper.to_array(onnx.load_tensor(str(case_dir / "test_data_set_0/input_0.pb")))
    want = numpy_helper.to_array(onnx.load_tensor(str(case_dir / "test_data_set_0/output_0.pb")))
    result = convert(m, bn=mode)
    expected_ops = ["BatchNormalization"] if mode == "keep" else ["Mul", "Add"]
    assert op_types(result.model) == expected_ops
    got = run(result.model, {m.graph.input[0].name: x})[0]
    assert close(got, want, rtol=1e-5, atol=1e-5), np.max(np.abs(got - want))
