"""Verification on real inputs (--inputs): each format, its errors, NaN/Inf, class-score agreement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter import convert, zoo
from converter.cli import main
from converter.verify import class_agreement
from examples.digits.data import load_split
from examples.digits.samples import samples_npz
from tests.converter.graphs import bn_initializers, bn_node, bn_params, model

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "service" / "models" / "digits" / "1" / "model.onnx"
SAMPLES = ROOT / "service" / "models" / "digits" / "samples.npz"


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), err
    return lines[0]


def fixed_gemm(tmp_path: Path) -> Path:
    """x [1, 20] -> Gemm -> BN -> y [1, 4]: a fixed batch of one."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 20)).astype(np.float32), "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["g"], name="fc", transB=1), bn_node("g", "y")]
    path = tmp_path / "fixed.onnx"
    onnx.save(model(nodes, [("x", [1, 20])], ["y"], [w, *bn_initializers(bn_params(rng, 4))]), str(path))
    return path


def convert_json(tmp_path: Path, src: Path, *extra: str) -> tuple[int, dict[str, object]]:
    report = tmp_path / "report.json"
    code = main(["convert", str(src), "-o", str(tmp_path / "out.onnx"), "--report", str(report), "-q", *extra])
    return code, json.loads(report.read_text()) if report.exists() else {}


def sample_checks(data: dict[str, object]) -> list[dict[str, object]]:
    checks = [data["verification"], *data["extra_verifications"]]  # type: ignore[list-item]
    return [c for c in checks if "samples from" in c["inputs_from"]]  # type: ignore[index]


def test_shipped_samples_are_what_the_script_writes() -> None:
    with np.load(SAMPLES) as a, np.load(__import__("io").BytesIO(samples_npz())) as b:
        assert a.files == b.files == ["pixels"]
        np.testing.assert_array_equal(a["pixels"], b["pixels"])


def test_npz_on_the_digits_model_top_k_agreement(tmp_path: Path) -> None:
    code, data = convert_json(tmp_path, DIGITS, "--inputs", str(SAMPLES))
    assert code == 0
    (check,) = sample_checks(data)
    assert check["runs"] == 100 and check["inputs"] == {"pixels": [1, 1, 8, 8]}
    (logits,) = check["outputs"]  # type: ignore[misc]
    assert logits["passed"] and logits["top1"] == 1.0 and logits["topk"] == 1.0 and logits["k"] == 5
    assert data["verification"]["inputs_from"] == "seed 0 random inputs"  # type: ignore[index]


def test_python_api_on_all_held_out_digits(tmp_path: Path) -> None:
    npz = tmp_path / "test.npz"
    np.savez(npz, pixels=load_split().x_test.astype(np.float32))
    report = convert(DIGITS, inputs=[npz], random=False).report
    assert report.verification is not None and not report.extra_verifications
    assert report.verification.runs == 450
    (logits,) = report.verification.outputs
    assert (logits.top1, logits.topk) == (1.0, 1.0)


def test_class_agreement_counts_disagreements() -> None:
    want = [np.array([[0.0, 1.0, 0.5]]), np.array([[2.0, 1.0, 0.0]])]
    got = [np.array([[1.0, 0.0, 0.5]]), np.array([[2.0, 1.0, 0.0]])]  # first sample: classes 0 and 1 swap
    top1, topk, k = class_agreement(got, want)  # type: ignore[misc]
    assert (top1, k) == (0.5, 2) and topk == 0.75  # top-2 {1, 2} vs {0, 2} overlap 1/2; second sample 2/2
    assert class_agreement([np.zeros((1, 2, 2))], [np.zeros((1, 2, 2))]) is None  # not class scores


def test_directory_of_npy_and_npz(tmp_path: Path) -> None:
    pixels = load_split().x_test.astype(np.float32)
    folder = tmp_path / "samples"
    folder.mkdir()
    np.save(folder / "a.npy", pixels[:3])
    np.savez(folder / "b.npz", pixels=pixels[3:8])
    (folder / "notes.txt").write_text("ignored")
    code, data = convert_json(tmp_path, DIGITS, "--inputs", str(folder), "--no-random")
    assert code == 0
    (check,) = sample_checks(data)
    assert check["runs"] == 8 and data["extra_verifications"] == []


def test_v2_request_json(tmp_path: Path) -> None:
    x = load_split().x_test[:3].astype(np.float32)
    body = {"inputs": [{"name": "pixels", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
    request = tmp_path / "request.json"
    request.write_text(json.dumps(body))
    code, data = convert_json(tmp_path, DIGITS, "--inputs", str(request), "--inputs", str(SAMPLES))
    assert code == 0
    (check,) = sample_checks(data)
    assert check["runs"] == 103


@pytest.mark.parametrize("shape", [(6, 20), (6, 1, 20)])
def test_fixed_batch_of_one_takes_either_layout(tmp_path: Path, shape: tuple[int, ...]) -> None:
    npz = tmp_path / "x.npz"
    np.savez(npz, x=np.random.default_rng(1).standard_normal(shape).astype(np.float32))
    code, data = convert_json(tmp_path, fixed_gemm(tmp_path), "--inputs", str(npz))
    assert code == 0 and sample_checks(data)[0]["runs"] == 6


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


BAD = {
    "wrong name": (lambda d: _npz(d / "s.npz", x=np.zeros((2, 1, 8, 8), np.float32)), "names no input"),
    "missing input": (lambda d: _npz(d / "s.npz"), "no array for model input"),
    "wrong shape": (lambda d: _npz(d / "s.npz", pixels=np.zeros((2, 1, 9, 8), np.float32)), "axis 2"),
    "wrong rank": (lambda d: _npz(d / "s.npz", pixels=np.zeros((2, 8, 8), np.float32)), "does not fit"),
    "wrong dtype": (lambda d: _npz(d / "s.npz", pixels=np.full((2, 1, 8, 8), "a")), "not numeric"),
    "no samples": (lambda d: _npz(d / "s.npz", pixels=np.zeros((0, 1, 8, 8), np.float32)), "no samples"),
    "empty npz": (lambda d: _write(d / "s.npz", ""), "not a readable .npz"),
    "empty json": (lambda d: _write(d / "s.json", ""), "not a readable JSON"),
    "json of another kind": (lambda d: _write(d / "s.json", "[1]"), "not a V2 inference"),
    "json data too short": (
        lambda d: (
            (d / "s.json").write_text(
                json.dumps({"inputs": [{"name": "pixels", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": [1]}]})
            )
            and d / "s.json"
        ),
        "does not fit shape",
    ),
    "empty directory": (lambda d: _mkdir(d / "empty"), "no .npz, .npy or .json"),
    "missing file": (lambda d: d / "nope.npz", "no such file"),
    "unknown suffix": (lambda d: _write(d / "s.csv", "1,2"), "must be an .npz"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs_are_exit_2_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: object) -> None:
    make, message = case  # type: ignore[misc]
    path = make(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["convert", str(DIGITS), "-o", str(out), "--inputs", str(path)]) == 2
    assert message in one_line_error(capsys)
    assert not out.exists()
    assert main(["inspect", str(DIGITS), "--inputs", str(path)]) == 2
    assert message in one_line_error(capsys)


def test_fixed_batch_other_than_one_and_integer_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = zoo.resnet(blocks=(1,), classes=5, image=16, batch=2)
    src = tmp_path / "b2.onnx"
    onnx.save(m, str(src))
    npz = _npz(tmp_path / "s.npz", **{m.graph.input[0].name: np.zeros((2, 3, 16, 16), np.float32)})
    assert main(["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--inputs", str(npz)]) == 2
    assert "fixed at 2" in one_line_error(capsys)
    idx = model([helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)], [("i", [1, 3])], ["y"])
    idx.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.save(idx, str(tmp_path / "int.onnx"))
    floats = _npz(tmp_path / "f.npz", i=np.zeros((2, 3), np.float32))
    assert main(["convert", str(tmp_path / "int.onnx"), "-o", str(tmp_path / "o.onnx"), "--inputs", str(floats)]) == 2
    assert "float data" in one_line_error(capsys)


def test_no_random_needs_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["convert", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--no-random"]) == 2
    assert "--no-random needs --inputs" in one_line_error(capsys)


def test_nan_is_flagged_never_a_pass_and_real_inputs_are_the_remedy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Log(Conv→BN): random inputs give negative values, NaN in both models; verification must not pass."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(np.abs(rng.standard_normal((2, 1, 1, 1))).astype(np.float32), "W")
    p = bn_params(rng, 2)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        bn_node("c", "b"),
        helper.make_node("Log", ["b"], ["y"]),
    ]
    src = tmp_path / "log.onnx"
    onnx.save(model(nodes, [("x", [1, 1, 2, 2])], ["y"], [w, *bn_initializers(p)]), str(src))
    out = tmp_path / "out.onnx"
    assert main(["convert", str(src), "-o", str(out)]) == 3
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and "--inputs" in err.splitlines()[-1] and not out.exists()
    # inputs that keep BN's output positive: γ·(x − μ)/σ + β > 0 for large enough x
    x = np.full((4, 1, 1, 2, 2), 50.0, np.float32) * np.sign(p.gamma[0])
    npz = _npz(tmp_path / "s.npz", x=x)
    scaled = np.abs(w.float_data or numpy_helper.to_array(w)).reshape(2, 1) * 50 - p.running_mean.reshape(2, 1)
    if np.all(p.gamma.reshape(2, 1) * scaled / np.sqrt(p.running_var.reshape(2, 1) + 1e-5) + p.beta.reshape(2, 1) > 0):
        code, data = convert_json(tmp_path, src, "--inputs", str(npz), "--no-random")
        assert code == 0, capsys.readouterr().err
        (check,) = sample_checks(data)
        assert check["outputs"][0]["nonfinite_original"] == 0  # type: ignore[index]
    else:
        pytest.fail("test data no longer keeps the BN output positive")
