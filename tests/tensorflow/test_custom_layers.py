"""A Keras model with a custom layer: ``--import MODULE`` registers it before loading (command line),
``custom_objects=`` (Python); without either, the one-line error names the objects and the way out."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import onnx
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
import keras

from converter import cli
from converter.frontends import tensorflow as tf_frontend
from converter.options import Options
from converter.pipeline import convert_file

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LAYER = """
import keras


@keras.saving.register_keras_serializable(package="{module}")
class Scale(keras.layers.Layer):
    def __init__(self, factor=2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return x * self.factor

    def get_config(self):
        return {{**super().get_config(), "factor": self.factor}}
"""


def _network(scale: keras.layers.Layer) -> keras.Model:
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, scale(x))


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A .keras file whose Scale layer is registered by a module in the current directory; afterwards this process
    forgets the module and its registration, as a fresh `bnfold convert` process never had them."""
    module = f"bnfold_test_layers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(LAYER.format(module=module)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    layers = __import__(module)
    _network(layers.Scale(3.0)).save(str(tmp_path / "custom.keras"))
    del sys.modules[module]
    del keras.saving.get_custom_objects()[f"{module}>Scale"]
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    return tmp_path / "custom.keras", module


def test_custom_layer_converts_with_import(
    registered: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, module = registered
    out = tmp_path / "out.onnx"
    assert cli.main(["convert", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"custom object(s) {module}>Scale" in err and f"--import {module};" in err and "model.export" in err
    assert not out.exists()

    assert cli.main(["convert", str(src), "-o", str(out), "--import", module]) == 0, capsys.readouterr().err
    assert "verification passed against TensorFlow" in capsys.readouterr().out
    assert tf_frontend.affine_pairs(onnx.load(str(out))) == {"batchnorm": 0, "mul_add": 0}


def test_import_of_a_py_file_and_its_errors(
    registered: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, module = registered
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / f"{module}.py").rename(elsewhere / f"{module}.py")
    out = tmp_path / "out.onnx"
    assert cli.main(["inspect", str(src), "--import", str(elsewhere / f"{module}.py")]) == 0
    assert "folded" in capsys.readouterr().out
    for bad, says in (("no_such_module_here", "ModuleNotFoundError"), ("missing.py", "no such file")):
        assert cli.main(["convert", str(src), "-o", str(out), "--import", bad]) == 2
        err = capsys.readouterr().err
        assert err == f"bnfold: error: --import {bad}: {says}" + err.split(says, 1)[1] and err.count("\n") == 1


def test_custom_objects_in_python(tmp_path: Path) -> None:
    class Shift(keras.layers.Layer):  # not registered: Keras finds it only through custom_objects
        def call(self, x: object) -> object:
            return x + 1.0  # type: ignore[operator]

    src = tmp_path / "shift.keras"
    _network(Shift()).save(str(src))
    with pytest.raises(tf_frontend.InputError, match="custom_objects= in Python"):
        convert_file(src, tmp_path / "out.onnx", Options())
    report = convert_file(src, tmp_path / "out.onnx", Options(), custom_objects={"Shift": Shift})
    assert len(report.verifications) == 2 and not report.kept
    assert tf_frontend.affine_pairs(onnx.load(str(tmp_path / "out.onnx")))["mul_add"] == 0
