"""PyTorch files through the CLI: TorchScript and ExportedProgram in, refusals out (one line, exit 2, no file)."""

from __future__ import annotations

import builtins
import json
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from converter.cli import main
from converter.frontends import torch as torch_frontend
from tests.torch.nets import ARCHITECTURES, assert_close, batchnorms, inputs, op_types, run_onnx, trained

SHAPE = (2, 3, 32, 32)
# torch deprecates torch.jit.* in favour of torch.export; both formats are still supported here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    module, shape, _ = ARCHITECTURES["resnet"]()
    assert shape == SHAPE
    return trained(module, SHAPE)


@pytest.fixture(scope="module")
def scripted(resnet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "resnet.pt"
    torch.jit.script(resnet).save(str(path))
    return path


@pytest.fixture(scope="module")
def program(resnet: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ep") / "resnet.pt2"
    torch.export.save(torch.export.export(resnet, (inputs(SHAPE, 7),)), str(path))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bnfold: error: ")
    assert "Traceback" not in err
    return lines[0]


def check_output(out: Path, module: nn.Module) -> None:
    model = onnx.load(str(out))
    assert "BatchNormalization" not in op_types(model)
    x = inputs(SHAPE, seed=3)
    with torch.no_grad():
        want = module(x).numpy()
    [got] = run_onnx(str(out), {model.graph.input[0].name: x.numpy()})
    assert_close(got, want)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_file(how: str, resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "model.pt"
    ts = torch.jit.script(resnet) if how == "script" else torch.jit.trace(resnet, (inputs(SHAPE, 0),))
    ts.save(str(src))
    out, report = tmp_path / "model.onnx", tmp_path / "report.json"
    args = ["convert", str(src), "-o", str(out), "--input-shape", "2,3,32,32", "--report", str(report)]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"bnfold: {src} -> {out}")  # no exporter chatter on stdout
    assert "verification passed against PyTorch eval on seed 0 random inputs" in captured.out
    assert captured.err == ""
    check_output(out, resnet)
    data = json.loads(report.read_text())
    assert data["before"]["batchnorms"] == len(data["layers"]) == len(batchnorms(resnet))
    assert all(layer["action"] == "folded" for layer in data["layers"])
    assert data["verification"]["reference"] == "the exported ONNX model"
    [check] = data["extra_verifications"]
    assert check["passed"] and check["reference"].startswith("PyTorch eval")
    assert check["inputs"] == {"input": list(SHAPE)}
    assert {"export", "rewrite", "save", "verify", "verify_pytorch", "total"} <= set(data["seconds"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt", "report.json"]


def test_exported_program_file_with_its_stored_example_inputs(
    program: Path, resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    assert main(["convert", str(program), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "against PyTorch eval on the program's stored example inputs" in text
    assert "dynamo=True, optimize=False" in text
    assert "BatchNormalization 6 -> 0" in text
    check_output(out, resnet)


def test_exported_program_file_with_an_input_shape(program: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "model.onnx", tmp_path / "r.json"
    assert main(["convert", str(program), "-o", str(out), "--input-shape", "input=2,3,32,32", "--seed", "5", "-q",
                 "--report", str(report)]) == 0  # fmt: skip
    [check] = json.loads(report.read_text())["extra_verifications"]
    assert check["reference"] == "PyTorch eval on seed 5 random inputs" and check["passed"]


def test_the_kind_is_read_from_the_content_not_the_suffix(
    scripted: Path, program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for src, kind in ((scripted, torch_frontend.TORCHSCRIPT), (program, torch_frontend.EXPORTED_PROGRAM)):
        renamed = tmp_path / f"{kind}.bin"
        renamed.write_bytes(src.read_bytes())
        assert torch_frontend.sniff(renamed) == kind
    assert main(["inspect", str(tmp_path / "TorchScript.bin"), "--input-shape", "2,3,32,32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["action"] for layer in data["layers"]] == ["folded"] * 6


# -- refusals ----------------------------------------------------------------------------------------------


def test_a_pickled_module_or_state_dict_is_refused(
    resnet: nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickles = {
        "module.pt": lambda p: torch.save(resnet, p),
        "weights.pth": lambda p: torch.save(resnet.state_dict(), p),
        "legacy.pt": lambda p: torch.save(resnet.state_dict(), p, _use_new_zipfile_serialization=False),
        "module.bin": lambda p: torch.save(resnet, p),  # a zip, whatever its name
    }
    for name, save in pickles.items():
        src, out = tmp_path / name, tmp_path / "out.onnx"
        save(src)
        assert main(["convert", str(src), "-o", str(out), "--input-shape", "2,3,32,32"]) == 2
        line = one_line_error(capsys)
        assert "pickled" in line and "never unpickles" in line
        assert "torch.jit.script(model).save(" in line and "torch.export.save(" in line
        assert not out.exists()


def test_without_torch_the_error_names_the_extra(
    scripted: Path, program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_torch(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".", maxsplit=1)[0] in ("torch", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    for src in (scripted, program):
        out = tmp_path / "out.onnx"
        assert main(["convert", str(src), "-o", str(out), "--input-shape", "2,3,32,32"]) == 2
        line = one_line_error(capsys)
        assert str(src) in line and 'pip install ".[torch]"' in line
        assert not out.exists()


def test_without_onnxscript_an_exported_program_names_the_extra(
    program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setitem(sys.modules, "onnxscript.optimizer", None)
    assert main(["convert", str(program), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "needs onnxscript" in one_line_error(capsys)


def _rewrite_member(src: Path, dst: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, data if info.filename.endswith(member) else zin.read(info))


def corrupt_files(scripted: Path, program: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error says)"""
    data = scripted.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, content: bytes, says: str) -> None:
        path = tmp_path / name
        path.write_bytes(content)
        cases[name] = (path, says)

    put("empty.pt", b"", "not a PyTorch file")
    put("random.pt", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a PyTorch file")
    put("truncated.pt", data[: len(data) // 2], "corrupt or truncated")
    put("truncated.pt2", program.read_bytes()[:5000], "corrupt or truncated")
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
        z.writestr("plain/readme.txt", "hello")
    cases["plain.zip"] = (tmp_path / "plain.zip", "not a TorchScript")
    _rewrite_member(scripted, tmp_path / "badpickle.pt", "data.pkl", b"\x80\x02garbage")
    cases["badpickle.pt"] = (tmp_path / "badpickle.pt", "cannot load TorchScript")
    _rewrite_member(program, tmp_path / "badjson.pt2", "models/model.json", b"{not json")
    cases["badjson.pt2"] = (tmp_path / "badjson.pt2", "cannot load the ExportedProgram")
    return cases


def test_a_corrupt_file_is_exit_2_one_line_no_output(
    scripted: Path, program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "in"
    work.mkdir()
    for name, (src, says) in corrupt_files(scripted, program, work).items():
        out = tmp_path / "out.onnx"
        assert main(["convert", str(src), "-o", str(out), "--input-shape", "2,3,32,32"]) == 2, name
        line = one_line_error(capsys)
        assert says in line, (name, line)
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_an_exported_program_that_would_be_unpickled_is_refused(
    program: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with zipfile.ZipFile(program) as z:
        name = next(n for n in z.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(z.read(name))
    first = next(iter(config["config"]))
    config["config"][first]["use_pickle"] = True
    bad = tmp_path / "pickled.pt2"
    _rewrite_member(program, bad, name.split("/", 1)[1], json.dumps(config).encode())
    assert main(["convert", str(bad), "-o", str(tmp_path / "o.onnx")]) == 2
    line = one_line_error(capsys)
    assert "stores pickled objects" in line and first in line


def test_input_problems_are_exit_2(scripted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.onnx")
    assert main(["convert", str(scripted), "-o", out]) == 2
    assert "no input shapes; give them (input_shapes=DIMS in Python, --input-shape DIMS" in one_line_error(capsys)
    assert main(["convert", str(scripted), "-o", out, "--input-shape", "2,5,32,32"]) == 2
    assert "PyTorch cannot run it on inputs of shape 2x5x32x32" in one_line_error(capsys)
    assert main(["convert", str(scripted), "-o", out, "--input-shape", "image=2,3,32,32"]) == 2
    assert "input shapes given for no input of forward(input)" in one_line_error(capsys)
    assert main(["convert", str(scripted), "--in-place", "--input-shape", "2,3,32,32"]) == 2
    assert "--in-place needs an ONNX input" in one_line_error(capsys)
    assert not Path(out).exists()


def test_a_disagreement_with_pytorch_is_exit_3_and_writes_nothing(
    scripted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = torch_frontend._run
    monkeypatch.setattr(torch_frontend, "_run", lambda *a: [y + 0.01 for y in real_run(*a)])
    out = tmp_path / "o.onnx"
    assert main(["convert", str(scripted), "-o", str(out), "--input-shape", "2,3,32,32"]) == 3
    err = capsys.readouterr().err
    assert "verification passed against the exported ONNX model" in err  # the report, on stderr
    assert "verification FAILED against PyTorch eval" in err
    assert err.strip().splitlines()[-1].startswith("bnfold: error: verification against PyTorch failed: output")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_trace_taken_in_train_mode_fails_with_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module, shape, _ = ARCHITECTURES["conv1d"]()
    trained(module, shape).train()
    src = tmp_path / "train.pt"
    torch.jit.trace(module, (inputs(shape, 0),)).save(str(src))
    assert main(["convert", str(src), "-o", str(tmp_path / "o.onnx"), "--input-shape", "2,4,64"]) == 3
    assert "traced in train mode?" in capsys.readouterr().err
