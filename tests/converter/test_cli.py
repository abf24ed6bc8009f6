"""The convert/inspect commands: exit codes, one-line errors, atomic output, reports, external data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from converter import modelio, zoo
from converter.cli import main, parse_shapes
from converter.errors import InputError
from tests.converter.graphs import bn_initializers, bn_node, bn_params, model, op_types


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(zoo.resnet(blocks=(1,), classes=5, image=16), str(path))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bnfold: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_convert_writes_a_folded_model_and_prints_the_report(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = src.with_name("out.onnx")
    assert main(["convert", str(src), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "folded" in text and "verification passed" in text
    assert "BatchNormalization" not in op_types(onnx.load(str(out)))
    assert sorted(p.name for p in src.parent.iterdir()) == ["in.onnx", "out.onnx"]  # nothing else left behind


def test_report_json(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, report = src.with_name("out.onnx"), src.with_name("report.json")
    assert main(["convert", str(src), "-o", str(out), "--report", str(report), "-q"]) == 0
    assert capsys.readouterr().out == ""
    data = json.loads(report.read_text())
    assert data["before"]["batchnorms"] == len(data["layers"]) == 3
    assert data["after"]["batchnorms"] == 0
    assert data["verification"]["passed"] is True
    assert {"load", "rewrite", "save", "verify", "total"} <= set(data["seconds"])


BAD_FILES = {
    "empty": b"",
    "text": b"this is not a model\n",
    "json": b'{"graph": {}}',
    "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_input_is_exit_2_one_line_no_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    bad, out = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    bad.write_bytes(content)
    assert main(["convert", str(bad), "-o", str(out)]) == 2
    assert "not an ONNX model" in one_line_error(capsys) or "invalid ONNX model" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.onnx"]


def test_truncated_model(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    assert main(["convert", str(src), "-o", str(src.with_name("o.onnx"))]) == 2
    assert str(src) in one_line_error(capsys)
    assert not src.with_name("o.onnx").exists()


def test_missing_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "no such file" in one_line_error(capsys)
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "directory" in one_line_error(capsys)


def test_invalid_graph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = model([helper.make_node("Relu", ["x"], ["y"])], [("x", [1])], ["y"])
    m.graph.node[0].input[0] = "does_not_exist"
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    assert main(["convert", str(path), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "invalid ONNX model" in one_line_error(capsys)


def test_output_directory_must_exist(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(src), "-o", str(src.parent / "missing" / "o.onnx")]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_input_is_never_overwritten_without_in_place(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = src.read_bytes()
    assert main(["convert", str(src), "-o", str(src)]) == 2
    assert "--in-place" in one_line_error(capsys)
    assert main(["convert", str(src)]) == 2
    assert "-o OUT" in one_line_error(capsys)
    assert src.read_bytes() == before
    assert main(["convert", str(src), "--in-place", "-q"]) == 0
    assert "BatchNormalization" not in op_types(onnx.load(str(src)))
    assert [p.name for p in src.parent.iterdir()] == ["in.onnx"]


def test_verification_failure_is_exit_3_and_writes_nothing(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = src.with_name("out.onnx")
    # a zero tolerance cannot hold: folding changes float32 rounding
    code = main(["convert", str(src), "-o", str(out), "--atol", "0", "--rtol", "0", "--report", str(out) + ".json"])
    assert code == 3
    err = capsys.readouterr().err
    assert "verification FAILED" in err  # the report goes to stderr
    assert err.strip().splitlines()[-1].startswith("bnfold: error: verification failed: logits (max abs")
    assert [p.name for p in src.parent.iterdir()] == ["in.onnx"]


def test_no_verify_skips_verification(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = src.with_name("out.onnx")
    assert main(["convert", str(src), "-o", str(out), "--no-verify", "--atol", "0", "--rtol", "0"]) == 0
    assert "verification" not in capsys.readouterr().out


def test_inspect_writes_nothing(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(src)]) == 0
    assert "folded  into Conv" in capsys.readouterr().out
    assert main(["inspect", str(src), "--json", "--bn", "keep"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["action"] for r in data["layers"]} == {"kept"}
    assert data["verification"] is None
    assert [p.name for p in src.parent.iterdir()] == ["in.onnx"]


def test_input_shape_for_dynamic_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dyn.onnx"
    onnx.save(zoo.resnet(blocks=(1,), classes=5, image=16, batch="N"), str(path))
    out = tmp_path / "o.onnx"
    assert main(["convert", str(path), "-o", str(out), "--input-shape", "3,3,16,16", "--report", str(out) + ".j"]) == 0
    assert json.loads(Path(str(out) + ".j").read_text())["verification"]["inputs"] == {"input": [3, 3, 16, 16]}
    assert main(["convert", str(path), "-o", str(out), "--input-shape", "input=2,3,17,16"]) == 2
    assert "static dim 16 on axis 2" in one_line_error(capsys)
    assert main(["convert", str(path), "-o", str(out), "--input-shape", "nope=1,3,16,16"]) == 2
    assert "input shapes given for no input of the model: nope" in one_line_error(capsys)


def test_parse_shapes() -> None:
    assert parse_shapes(None) is None
    assert parse_shapes(["1,3,224,224"]) == [1, 3, 224, 224]
    assert parse_shapes(["a=1,2", "b=3"]) == {"a": [1, 2], "b": [3]}
    for bad in (["1,x"], ["a=1", "2"], ["1", "2"], [""], ["-1,2"]):
        with pytest.raises(InputError):
            parse_shapes(bad)


def test_external_data_in_and_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = zoo.resnet(blocks=(1,), classes=5, image=16)
    src = tmp_path / "ext.onnx"
    onnx.save(m, str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "o.onnx"
    assert main(["convert", str(src), "-o", str(out), "-q"]) == 0
    assert (tmp_path / "o.onnx.data").exists()  # input had external data: so has the output
    assert out.stat().st_size < 20_000
    folded = onnx.load(str(out))
    assert "BatchNormalization" not in op_types(folded)
    (tmp_path / "ext.onnx.data").unlink()
    assert main(["convert", str(src), "-o", str(tmp_path / "p.onnx")]) == 2
    assert "external data" in one_line_error(capsys)


def test_large_outputs_are_saved_with_external_data(
    src: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(modelio, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = src.with_name("out.onnx")
    assert main(["convert", str(src), "-o", str(out), "-q"]) == 0
    assert src.with_name("out.onnx.data").exists()
    onnx.checker.check_model(str(out))


def test_bad_options(src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", str(src), "-o", str(src.with_name("o.onnx")), "--fp16-io"]) == 2
    assert "--fp16-io needs --fp16" in one_line_error(capsys)
    assert main(["convert", str(src), "-o", str(src.with_name("o.onnx")), "--atol", "-1"]) == 2
    one_line_error(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(src), "--bn", "nope"])
    assert exc.value.code == 2


def test_affine_mode_on_a_model_with_unfoldable_bn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = bn_params(rng, 3)
    m = model([bn_node("x", "y")], [("x", [1, 3, 4, 4])], ["y"], bn_initializers(p))
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(m, str(path))
    assert main(["convert", str(path), "-o", str(out), "--bn", "affine", "-q"]) == 0
    assert op_types(onnx.load(str(out))) == ["Mul", "Add"]


def test_python_dash_m_and_the_entry_point(src: Path) -> None:
    out = src.with_name("o.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "converter", "convert", str(src), "-o", str(out), "-q"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "converter", "convert", str(src.with_name("nope"))],
        check=False,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
