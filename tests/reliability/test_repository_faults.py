"""Faults in the model repository: corrupt models stay not ready while the others serve; versions added or
replaced while serving are published whole (no request ever sees a half-written or half-loaded model)."""

from __future__ import annotations

import pickle
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.settings import BUNDLED_REPOSITORY
from tests.support.reliability import DIGITS, Reply, call, infer_body, scale_model, wait_until
from tests.support.servers import Server, save, start

pytestmark = pytest.mark.slow  # subprocess servers: their log lines are checked

X = [1.0, 2.0, 3.0, 4.0]


class Marker:
    """Unpickling this would create a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def training_bn_model() -> onnx.ModelProto:
    """BatchNormalization in training mode whose statistics outputs are graph outputs: cannot be folded."""
    c = 3
    inits = [
        numpy_helper.from_array(np.ones(c, np.float32), "s"),
        numpy_helper.from_array(np.zeros(c, np.float32), "b"),
        numpy_helper.from_array(np.zeros(c, np.float32), "m"),
        numpy_helper.from_array(np.ones(c, np.float32), "v"),
    ]
    node = helper.make_node(
        "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], training_mode=1, name="bn"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4, 4])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "rm", "rv")],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    return m


def corrupt_files(tmp: Path) -> dict[str, bytes]:
    digits = (BUNDLED_REPOSITORY / "digits" / "1" / "model.onnx").read_bytes()
    broken = onnx.load_from_string(digits)
    broken.graph.node[1].input[0] = "no_such_tensor"
    no_opset = scale_model(2.0)
    del no_opset.opset_import[:]
    return {
        "empty": b"",
        "text": b"this is not a model\n",
        "truncated": digits[: len(digits) // 2],
        "garbage": bytes(np.random.default_rng(7).integers(0, 256, 2048, dtype=np.uint8)),
        "brokengraph": broken.SerializeToString(),
        "noopset": no_opset.SerializeToString(),
        "trainingbn": training_bn_model().SerializeToString(),
        "pickled": pickle.dumps(Marker(str(tmp / "UNPICKLED"))),
    }


@pytest.fixture(scope="module")
def corrupt_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, list[str]]]:
    tmp = tmp_path_factory.mktemp("corrupt")
    repo = tmp / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    files = corrupt_files(tmp)
    for name, content in files.items():
        path = repo / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    srv = start(tmp, "--model-repository", str(repo))
    yield srv, tmp, list(files)
    assert srv.stop() == 0


def test_corrupt_models_are_not_ready_while_the_others_serve(corrupt_repo: tuple[Server, Path, list[str]]) -> None:
    srv, tmp, names = corrupt_repo
    assert call(srv.port, "GET", "/v2/health/ready").status == 200
    r = call(srv.port, "POST", "/v2/models/digits/infer", infer_body([DIGITS]))
    assert r.status == 200, r.body
    for name in names:
        r = call(srv.port, "GET", f"/v2/models/{name}/ready")
        assert r.status == 503 and r.json()["ready"] is False, (name, r.status, r.body)  # type: ignore[index]
        r = call(srv.port, "POST", f"/v2/models/{name}/infer", infer_body([DIGITS]))
        assert r.status == 503, (name, r.status, r.body)
        error = r.json()["error"]  # type: ignore[index]
        assert f"model '{name}' is not ready" in error and "\n" not in error
        assert call(srv.port, "GET", f"/v2/models/{name}/versions/1/ready").status == 503
    assert not (tmp / "UNPICKLED").exists()  # a pickle named model.onnx is never unpickled


def test_each_corrupt_model_has_one_clear_log_line(corrupt_repo: tuple[Server, Path, list[str]]) -> None:
    srv, _, names = corrupt_repo
    log = srv.output()
    assert "Traceback" not in log
    for name in names:
        lines = [ln for ln in log.splitlines() if f"model {name} version 1 is not ready: " in ln]
        assert len(lines) == 1, (name, lines)
        reason = lines[0].split("is not ready: ", 1)[1]
        assert str(Path(name) / "1" / "model.onnx") in reason, reason  # names the file
        assert re.search(r"not an ONNX model|cannot load it|cannot fold|invalid", reason), reason
    assert "model digits version 1 ready" in log


# ------------------------------------------------------------------------------------------------ hot reload
def values(reply: Reply) -> list[float]:
    return [float(v) for v in reply.json()["outputs"][0]["data"]]  # type: ignore[index]


def write_slowly(path: Path, content: bytes, cuts: list[int], pause: float) -> None:
    """Write ``content`` in place, non-atomically: truncate, then the pieces between ``cuts``, pausing after each."""
    write_in_stages(path, content, cuts, lambda: time.sleep(pause))


def write_in_stages(path: Path, content: bytes, cuts: list[int], after_each: Callable[[], None]) -> None:
    """Truncate ``path``, then write the pieces of ``content`` between ``cuts``; ``after_each`` runs after the
    truncation and after every piece but the last (the file then still holds a prefix)."""
    with path.open("wb") as f:
        f.flush()
        after_each()
        start = 0
        for cut in [*cuts, len(content)]:
            f.write(content[start:cut])
            f.flush()
            start = cut
            if cut != len(content):
                after_each()


def graph_end(model: onnx.ModelProto) -> int:
    """Offset just past the graph field: a file cut there still parses (as a model without opset_import)."""
    data, graph = model.SerializeToString(), model.graph.SerializeToString()
    return data.index(graph) + len(graph)


def test_versions_added_or_replaced_while_serving_are_published_whole(tmp_path: Path) -> None:
    pad = 256 << 10  # a quarter MiB of unused weights, so a copy takes several writes
    old, added, replacement = (scale_model(k, pad_to=pad) for k in (2.0, 3.0, 5.0))
    expected = {2.0: [2 * x for x in X], 3.0: [3 * x for x in X], 5.0: [5 * x for x in X]}
    repo = tmp_path / "repo"
    save(old, repo, "m")
    srv = start(tmp_path, "--model-repository", str(repo), env={"BNFOLD_REPOSITORY_POLL_SECONDS": "0.2"})
    body = infer_body([{"name": "x", "shape": [4], "datatype": "FP32", "data": X}])
    seen: dict[str, list[tuple[float, int, list[float] | str]]] = {"default": [], "v1": [], "v2": []}
    paths = {
        "default": "/v2/models/m/infer",
        "v1": "/v2/models/m/versions/1/infer",
        "v2": "/v2/models/m/versions/2/infer",
    }
    stop = threading.Event()

    def query(key: str) -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            r = call(srv.port, "POST", paths[key], body)
            result: list[float] | str = values(r) if r.status == 200 else r.json()["error"]  # type: ignore[index]
            seen[key].append((time.monotonic(), r.status, result))

    threads = [threading.Thread(target=query, args=(k,)) for k in seen]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(v) >= 3 for v in seen.values()), 60, what="answers before the change")
        # (1) a new version directory appears, its file copied in quick chunks (no pause outlasts a rescan)
        (repo / "m" / "2").mkdir()
        data = added.SerializeToString()
        write_slowly(repo / "m" / "2" / "model.onnx", data, [len(data) * i // 8 for i in range(1, 8)], 0.05)
        wait_until(lambda: seen["default"] and seen["default"][-1][2] == expected[3.0], 30, what="version 2 serving")
        # (2) version 1 replaced in place by a copy that stalls at each of: empty, a few bytes, a prefix that parses,
        # until the server has seen that prefix settle and refused it; then whole
        data = replacement.SerializeToString()

        def refused() -> int:
            return srv.output().count("model m version 1 is not ready")

        def stall() -> None:
            before = refused()
            wait_until(lambda: refused() > before, 60, what="the half-written version 1 refused")

        write_in_stages(repo / "m" / "1" / "model.onnx", data, [1000, graph_end(replacement)], stall)
        wait_until(lambda: seen["v1"] and seen["v1"][-1][2] == expected[5.0], 30, what="version 1 replaced")
        counts = {k: len(v) for k, v in seen.items()}
        wait_until(lambda: all(len(seen[k]) >= n + 3 for k, n in counts.items()), 60, what="answers after it")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        code = srv.stop()
    log = srv.output()
    assert code == 0 and "Traceback" not in log, log[-3000:]

    def check(key: str, allowed_errors: set[int], sequence: list[list[float]]) -> None:
        """Every answer is 200 with one of ``sequence``'s outputs, in that order (never back), or an allowed error."""
        stage = 0
        for _, status, result in seen[key]:
            if status != 200:
                assert status in allowed_errors, (key, status, result)
                assert stage == 0, (key, "an error after the new version served", status, result)
                continue
            assert result in sequence, (key, "an output of neither model", result)
            index = sequence.index(result)  # type: ignore[arg-type]
            assert index >= stage, (key, "went back to the old model", result)
            stage = index
        assert stage == len(sequence) - 1, (key, "the new model never served")

    check("default", set(), [expected[2.0], expected[3.0]])
    check("v1", set(), [expected[2.0], expected[5.0]])
    check("v2", {404, 503}, [expected[3.0]])
    assert all(result == expected[3.0] for t, status, result in seen["default"][-3:])  # still v2 at the end
    assert "model m version 2 ready" in log and "model m version 1 replaced" in log
    # the stalled copy was seen half-written and refused at each stall, while the old version 1 went on serving
    assert log.count("model m version 1 is not ready") >= 3
    for line in log.splitlines():
        if "is not ready" in line:
            assert "model m version 1" in line or "model m version 2" in line, line
    assert all(len(answers) >= 10 for answers in seen.values()), {k: len(v) for k, v in seen.items()}


# A version directory whose name str.isdigit() accepts but int() does not ("²", U+00B2): a file-system name
# anyone can create by mistake. It must leave only itself out, at start and while the repository is polled.
ODD_VERSION = "\u00b2"


def test_an_odd_version_directory_at_start_does_not_stop_the_others(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    shutil.copytree(BUNDLED_REPOSITORY / "digits" / "1", repo / "digits" / ODD_VERSION)
    srv = start(tmp_path, "--model-repository", str(repo))
    try:
        assert call(srv.port, "POST", "/v2/models/digits/infer", infer_body([DIGITS])).status == 200
        assert call(srv.port, "GET", "/v2/models/digits").json()["versions"] == ["1"]  # type: ignore[index]
    finally:
        assert srv.stop() == 0


def test_an_odd_version_directory_added_while_serving_does_not_stop_reloads(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    srv = start(tmp_path, "--model-repository", str(repo), env={"BNFOLD_REPOSITORY_POLL_SECONDS": "0.2"})
    try:
        shutil.copytree(BUNDLED_REPOSITORY / "digits" / "1", repo / "digits" / ODD_VERSION)
        save(scale_model(2.0), repo, "added")  # the rescan that finds it also meets the odd directory
        body = infer_body([{"name": "x", "shape": [4], "datatype": "FP32", "data": X}])
        wait_until(
            lambda: call(srv.port, "POST", "/v2/models/added/infer", body).status == 200, 10, 0.2, "'added' served"
        )
        assert call(srv.port, "POST", "/v2/models/digits/infer", infer_body([DIGITS])).status == 200
    finally:
        assert srv.stop() == 0
    assert "Traceback" not in srv.output(), srv.output()[-3000:]
