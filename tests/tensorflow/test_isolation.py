"""TensorFlow stays out of every other code path, and its absence is one clear line (no TensorFlow needed)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]


def tiny_onnx(path: Path) -> None:
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])],
        [w],
    )
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=240, check=False
    )


def test_service_and_converter_do_not_import_tensorflow(tmp_path: Path) -> None:
    tiny_onnx(tmp_path / "m.onnx")
    code = f"""
import sys
import service.server, service.cli, converter, converter.cli, converter.pipeline
from converter import cli
assert cli.main(["convert", {str(tmp_path / "m.onnx")!r}, "-o", {str(tmp_path / "o.onnx")!r}, "-q"]) == 0
heavy = sorted(m for m in ("tensorflow", "tf2onnx", "keras", "h5py") if m in sys.modules)
print("HEAVY", heavy)
"""
    done = run(code)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def test_without_the_extra_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Sequential", "config": {}}))
    code = f"""
import sys
sys.modules["tensorflow"] = None  # as if the extra were not installed
from converter import cli
sys.exit(cli.main(["convert", {str(path)!r}, "-o", {str(tmp_path / "o.onnx")!r}]))
"""
    done = run(code)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert 'pip install ".[tensorflow]"' in done.stderr
