"""`bnfold convert` stopped by SIGINT (Ctrl-C) or SIGTERM (`timeout`, a CI cancel, `kill`) mid-conversion: one line
on stderr, exit 130 or 143, and nothing left beside the output, neither the output nor its `.bnfold-*` staging
directory.

Mid-conversion for certain, not by timing: the test watches the output directory until the staging directory
appears, stops the process there (SIGSTOP, then waits for the kernel to report it stopped), checks that the
staging directory still exists and the output is not in place, and only then queues the signal and lets the
process continue. If the conversion finished between the sighting and the stop, it tries again with a new one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.support.reliability import wait_until

SIZE = 2048  # a 2048x2048 float32 Gemm weight: a 16 MiB model, most of a second inside the staged write + verify


def big_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((SIZE, SIZE), dtype=np.float32)
    channel = lambda offset: rng.random(SIZE, dtype=np.float32) + offset  # noqa: E731
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.zeros(SIZE, np.float32), "b"),
        *(numpy_helper.from_array(channel(0.5), n) for n in ("gamma", "beta", "mean", "var")),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1),
        helper.make_node("BatchNormalization", ["h", "gamma", "beta", "mean", "var"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SIZE])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save(big_model(), str(path))
    return path


def staging(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".bnfold-")]


def stopped(pid: int) -> bool:
    """The kernel reports ``pid`` stopped (state T in /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def stop_mid_conversion(proc: subprocess.Popen[str], out: Path) -> bool:
    """Stop ``proc`` while its staging directory exists and ``out`` is not written; False if it finished first."""
    while proc.poll() is None:
        if staging(out.parent):
            proc.send_signal(signal.SIGSTOP)
            wait_until(lambda: stopped(proc.pid) or proc.poll() is not None, 30, 0.001, "the process stopped")
            if proc.poll() is None and staging(out.parent) and not out.exists():
                return True
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.002)  # the polling interval of this watch, not a synchronisation
    return False


@pytest.fixture
def python_sigint() -> Any:
    """Python's own SIGINT handler in this process for the test. A shell starts background jobs with SIGINT
    ignored; Python then installs no KeyboardInterrupt handler, and a child would inherit the ignored SIGINT (a
    handled one is reset to the default at exec, so the child's Python installs its own, as for a user's Ctrl-C)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    ("sig", "code", "message"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_mid_conversion_leaves_nothing_behind(
    source: Path, tmp_path: Path, sig: signal.Signals, code: int, message: str, python_sigint: None
) -> None:
    for attempt in range(5):
        work = tmp_path / f"attempt{attempt}"
        work.mkdir()
        out = work / "folded.onnx"
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "convert", str(source), "-o", str(out), "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])},
        )
        try:
            caught = stop_mid_conversion(proc, out)
            if caught:
                proc.send_signal(sig)  # pending while stopped: delivered the moment it continues
                proc.send_signal(signal.SIGCONT)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not caught:
            assert proc.returncode == 0, err
            continue
        assert proc.returncode == code, err
        assert err == f"bnfold: {message}\n"
        assert list(work.iterdir()) == [], "left behind: " + ", ".join(p.name for p in work.iterdir())
        return
    pytest.fail("the conversion finished before it could be stopped mid-way, 5 times")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_the_moment_the_staging_directory_is_made_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals, python_sigint: None
) -> None:
    """The narrowest window, made certain: the signal arrives as ``mkdtemp`` returns, before ``staged`` holds the
    directory. It is delivered once the directory is held, and the directory goes (found by the real-process test
    above: a Ctrl-C there once left a ``.bnfold-*`` behind)."""
    from converter import cli, modelio

    real = tempfile.mkdtemp

    def mkdtemp_then_signal(*args: Any, **kwargs: Any) -> str:
        path = real(*args, **kwargs)
        signal.raise_signal(sig)  # the handler runs at the next bytecode: here, inside mkdtemp's caller's window
        return path

    monkeypatch.setattr(modelio.tempfile, "mkdtemp", mkdtemp_then_signal)
    expected: type[BaseException] = KeyboardInterrupt if sig == signal.SIGINT else cli.Terminated
    with cli.sigterm_unwinds(), pytest.raises(expected), modelio.staged(tmp_path / "out.onnx"):
        pytest.fail("the signal must interrupt before the body runs")
    assert list(tmp_path.iterdir()) == []
