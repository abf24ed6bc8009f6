"""Corrupted ONNX files through ``bnfold convert``: never a traceback, never exit 1.

For every file: exit 2 with exactly one ``bnfold: error: ...`` line on stderr and no output file; or, when the
corruption still parses as a model, exit 3 (verification failed, nothing written) or exit 0 with an output that
this test itself proves equal to the (corrupted) input in ONNX Runtime.

The base is the bundled ``digits`` model (three BatchNorms, 87 KB). Most cases run ``converter.cli.main``
in-process; two go through the real commands in a subprocess.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converter.cli import main
from service.settings import BUNDLED_REPOSITORY

SOURCE = BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx"
DATA = SOURCE.read_bytes()
N = len(DATA)


def _model() -> onnx.ModelProto:
    return onnx.load_from_string(DATA)


def _edit(fn: Callable[[onnx.ModelProto], None]) -> bytes:
    m = _model()
    fn(m)
    return m.SerializeToString()


def _init(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _remove_node(m: onnx.ModelProto, name: str) -> None:
    node = next(n for n in m.graph.node if n.name == name)
    m.graph.node.remove(node)


def _set_init(m: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _init(m, name).CopyFrom(numpy_helper.from_array(array, name))


def _set_attr(m: onnx.ModelProto, node: str, attr: str, value: float) -> None:
    n = next(x for x in m.graph.node if x.name == node)
    for a in n.attribute:
        if a.name == attr:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(attr, value))


def _flip(offset: int, xor: int) -> bytes:
    data = bytearray(DATA)
    data[offset] ^= xor
    return bytes(data)


_rng = np.random.default_rng(20261127)
# flips: the node list (first 1.2 KB), the inputs/outputs/opset (last 400 B), and anywhere (mostly weights)
FLIP_OFFSETS = sorted(
    {
        *(int(o) for o in _rng.integers(0, 1200, 20)),
        *(int(o) for o in _rng.integers(N - 400, N, 10)),
        *(int(o) for o in _rng.integers(0, N, 10)),
    }
)
FLIPS = {f"flip@{o}": _flip(o, int(_rng.integers(1, 256))) for o in FLIP_OFFSETS}
CUTS = sorted({1, 2, 5, 10, 16, 64, 200, 1000, N // 8, N // 4, N // 3, N // 2, 2 * N // 3, 3 * N // 4, N - 100, N - 10})
TRUNCATED = {f"truncated@{c}": DATA[:c] for c in CUTS}

STRUCTURAL: dict[str, bytes] = {
    "empty": b"",
    "text": b"a text file, not a model\n",
    "json": b'{"graph": {"node": []}, "ir_version": 8}',
    "png magic": b"\x89PNG\r\n\x1a\n" + DATA[8:],
    "elf magic": b"\x7fELF" + DATA[4:],
    "zip magic": b"PK\x03\x04" + DATA[4:],
    "gzipped model": gzip.compress(DATA),
    "twice concatenated": DATA + DATA,  # parses: repeated fields merge (duplicate nodes and initializers)
    "zero-filled": bytes(N),
    "0xff-filled": b"\xff" * N,
    "node removed": _edit(lambda m: _remove_node(m, "conv2")),
    "node input renamed": _edit(lambda m: m.graph.node[4].input.__setitem__(0, "no_such_tensor")),
    "node output renamed": _edit(lambda m: m.graph.node[1].output.__setitem__(0, "renamed")),
    "graph input renamed": _edit(lambda m: setattr(m.graph.input[0], "name", "other")),
    "graph output removed": _edit(lambda m: m.graph.output.pop()),
    "BN mean initializer removed": _edit(lambda m: m.graph.initializer.remove(_init(m, "bn1.mean"))),
    "BN scale of the wrong length": _edit(lambda m: _set_init(m, "bn1.scale", np.ones(15, np.float32))),
    "BN var as int64": _edit(lambda m: _set_init(m, "bn2.var", np.ones(32, np.int64))),
    "conv weight of the wrong shape": _edit(lambda m: _set_init(m, "conv1.weight", np.ones((16, 2, 3, 3), np.float32))),
    "raw_data shorter than dims": _edit(lambda m: setattr(_init(m, "bn3.var"), "raw_data", b"\0" * 60)),
    "BN epsilon negative": _edit(lambda m: _set_attr(m, "bn1", "epsilon", -10.0)),
    "BN var negative": _edit(lambda m: _set_init(m, "bn2.var", -np.ones(32, np.float32))),
    "BN var NaN": _edit(lambda m: _set_init(m, "bn2.var", np.full(32, np.nan, np.float32))),
    "opset 99": _edit(lambda m: setattr(m.opset_import[0], "version", 99)),
    "ir_version 99": _edit(lambda m: setattr(m, "ir_version", 99)),
    "no opset import": _edit(lambda m: m.ClearField("opset_import")),
    "unknown op": _edit(lambda m: setattr(m.graph.node[3], "op_type", "NoSuchOp")),
    "external data that is not there": _edit(
        lambda m: (
            _init(m, "fc1.weight").ClearField("raw_data"),
            setattr(_init(m, "fc1.weight"), "data_location", TensorProto.EXTERNAL),
            _init(m, "fc1.weight").external_data.add(key="location", value="missing.bin"),
        )
    ),
    "external data escaping the folder": _edit(
        lambda m: (
            _init(m, "fc1.weight").ClearField("raw_data"),
            setattr(_init(m, "fc1.weight"), "data_location", TensorProto.EXTERNAL),
            _init(m, "fc1.weight").external_data.add(key="location", value="../../../../etc/passwd"),
        )
    ),
}
CASES = {**STRUCTURAL, **TRUNCATED, **FLIPS}


def ort_outputs(model: bytes | str) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in arg.shape]
        feeds[arg.name] = (rng.standard_normal(shape) * 8).astype(np.float32)
    return [np.asarray(o) for o in sess.run(None, feeds)]


def check_outcome(code: int, err: str, src: Path, out: Path) -> None:
    """The rules of the module docstring, for one finished conversion."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), err
        assert not out.exists()
    elif code == 3:
        # "verification failed: <output> (max abs ...)" or "verification could not run the models in ONNX Runtime"
        assert lines and lines[-1].startswith("bnfold: error: verification "), err
        assert not out.exists()
    elif code == 0:
        assert out.exists()
        onnx.checker.check_model(str(out))
        before, after = ort_outputs(str(src)), ort_outputs(str(out))
        assert len(before) == len(after)
        for b, a in zip(before, after, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            scale = float(np.nanmax(np.abs(b))) if np.isfinite(b).any() else 0.0
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 + 1e-4 * scale, equal_nan=True)
    else:
        raise AssertionError(f"exit code {code} (1 is an internal error, a bug):\n{err}")
    left = sorted(p.name for p in src.parent.iterdir())
    assert left == sorted({src.name, *([out.name] if code == 0 else [])}), left  # no temp files left behind


@pytest.mark.parametrize("content", CASES.values(), ids=CASES.keys())
def test_corrupt_onnx_is_exit_2_or_caught_by_verification(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(content)
    code = main(["convert", str(src), "-o", str(out), "-q"])
    check_outcome(code, capsys.readouterr().err, src, out)


def test_the_cases_cover_every_outcome_that_matters() -> None:
    assert len(CASES) >= 60
    assert len(STRUCTURAL) >= 20


@pytest.mark.parametrize(
    ("module", "name"),
    [("converter", "truncated@" + str(N // 2)), ("service", "node input renamed")],
    ids=["python -m converter, truncated", "bnfold entry point (python -m service), renamed input"],
)
def test_corrupt_onnx_through_the_real_command(module: str, name: str, tmp_path: Path) -> None:
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    src.write_bytes(CASES[name])
    proc = subprocess.run(
        [sys.executable, "-m", module, "convert", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    check_outcome(proc.returncode, proc.stderr, src, out)
    assert proc.stdout == ""
