"""Security: names from URLs never reach outside the repository; body and element limits stop memory
blow-ups; only ONNX (and, in the converter, TorchScript / torch.export) is ever loaded, never a pickle; the
API-key check is constant-time. The container (non-root, read-only root filesystem) is covered by
``scripts/docker-smoke``."""

from __future__ import annotations

import ast
import gzip
import io
import pickle
import shutil
import socket
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.cli import main as convert_main
from service.settings import BUNDLED_REPOSITORY
from tests.support.reliability import (
    DIGITS,
    call,
    hwm_mb,
    infer_body,
    raw,
    read_reply,
    request_bytes,
    reset_hwm,
    rss_mb,
)
from tests.support.servers import InThread, Server, in_process, start

ROOT = Path(__file__).resolve().parents[2]


class Marker:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def malicious_pickles(marker: Path) -> dict[str, bytes]:
    pk = pickle.dumps(Marker(marker), protocol=2)
    torch_zip = io.BytesIO()
    with zipfile.ZipFile(torch_zip, "w") as z:  # torch.save's zip layout
        z.writestr("archive/data.pkl", pk)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    torchscript_like = io.BytesIO()
    with zipfile.ZipFile(torchscript_like, "w") as z:  # looks like torch.jit.save: code/ and data.pkl
        z.writestr("archive/data.pkl", pk)
        z.writestr("archive/constants.pkl", pk)
        z.writestr("archive/code/__torch__.py", "")
        z.writestr("archive/version", "3\n")
    return {
        "legacy pickle": pk,
        "torch.save zip": torch_zip.getvalue(),
        "TorchScript-like zip": torchscript_like.getvalue(),
    }


# ------------------------------------------------------------------------------------------- the repository
@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InThread, Path]]:
    """A repository with digits, models in non-ONNX formats, and a real model *outside* it named ``outside``."""
    tmp = tmp_path_factory.mktemp("security")
    repo = tmp / "repo"
    shutil.copytree(BUNDLED_REPOSITORY / "digits", repo / "digits")
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp / "outside")  # tmp/outside/1/model.onnx
    marker = tmp / "UNPICKLED"
    for i, (kind, content) in enumerate(malicious_pickles(marker).items()):
        for file in ("model.pt", "model.pkl", "model.bin", "model.onnx"):
            path = repo / f"evil{i}-{file.split('.')[1]}" / "1" / file
            path.parent.mkdir(parents=True)
            path.write_bytes(content)
        assert kind
    with in_process(model_repository=repo, max_body_bytes=1 << 20) as srv:
        yield srv, tmp


def escape_targets(outside: Path) -> list[str]:
    absolute = str(outside).replace("/", "%2F")
    return [
        "/v2/models/../outside",
        "/v2/models/..%2Foutside",
        "/v2/models/..%2foutside",
        "/v2/models/%2e%2e%2Foutside",
        "/v2/models/%2E%2E/outside",
        "/v2/models/%252e%252e%252Foutside",
        "/v2/models/..%5Coutside",
        "/v2/models/..%00/outside",
        "/v2/models/%C0%AE%C0%AE%2Foutside",
        "/v2/models/digits/../../outside",
        "/v2/models/digits/versions/..%2F..%2Foutside%2F1",
        "/v2/models/digits/versions/%2e%2e",
        "/v2/models/digits/versions/1%2F..%2F..%2F..%2Foutside%2F1",
        "/v2/models/digits/versions/-1",
        "/v2/models/digits/versions/1e0",
        f"/v2/models/{absolute}",
        f"/v2/models/%2F{absolute}",
        f"/v2/models/{outside}",
        f"/v2/models//{outside}",
        "/v2/models/outside",
        "/v2/models/" + "a" * 20_000,
        "/v2/models/digits/versions/" + "9" * 5000,  # past Python's int() digit limit
        "/v2/models/digits/versions/%C2%B2",  # '²': str.isdigit() is True, int() refuses it
    ]


def test_model_names_and_versions_cannot_escape_the_repository(guarded: tuple[InThread, Path]) -> None:
    srv, tmp = guarded
    assert call(srv.port, "GET", "/v2/models/digits/ready").status == 200
    body = infer_body([DIGITS])
    problems = []
    for target in escape_targets(tmp / "outside"):
        for method, suffix, payload in (
            ("GET", "", b""),
            ("GET", "/ready", b""),
            ("GET", "/config", b""),
            ("POST", "/infer", body),
        ):
            r = call(srv.port, method, target + suffix, payload)
            context = f"{method} {(target + suffix)[:100]} -> {r.status} {r.body[:120]!r}"
            if r.status not in (400, 404, 405, 414) or (b"outside" in r.body and b"unknown" not in r.body):
                problems.append(context)
    assert not problems, "\n".join(problems)


def test_non_onnx_model_files_are_never_loaded(guarded: tuple[InThread, Path]) -> None:
    """model.pt/.pkl/.bin are not model files at all; a pickle named model.onnx is not ready; none unpickled."""
    srv, tmp = guarded
    for i in range(3):
        for ext in ("pt", "pkl", "bin"):
            assert call(srv.port, "GET", f"/v2/models/evil{i}-{ext}").status == 404
        r = call(srv.port, "GET", f"/v2/models/evil{i}-onnx/ready")
        assert r.status == 503
    assert not (tmp / "UNPICKLED").exists()


def test_the_converter_never_unpickles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "UNPICKLED"
    for kind, content in malicious_pickles(marker).items():
        for suffix in (".pt", ".pt2", ".pth", ".onnx", ".bin"):
            src = tmp_path / f"model{suffix}"
            src.write_bytes(content)
            code = convert_main(["convert", str(src), "-o", str(tmp_path / "out.onnx"), "--input-shape", "1,3"])
            err = capsys.readouterr().err
            assert code == 2, (kind, suffix, err)
            assert err.count("\n") == 1 and err.startswith("bnfold: error: "), (kind, suffix, err)
            assert not marker.exists(), (kind, suffix)
            assert not (tmp_path / "out.onnx").exists()
            src.unlink()


# ------------------------------------------------------------------------------------------------- limits
@pytest.fixture(scope="module")
def limited_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start(
        tmp_path_factory.mktemp("limits"),
        env={"BNFOLD_MAX_BODY_BYTES": str(1 << 20), "BNFOLD_MAX_ELEMENTS": "1000"},
    )
    yield srv
    assert srv.stop() == 0


def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped (about 1/1000 of the size)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    parts = [comp.compress(chunk) for _ in range(size >> 20)]
    parts.append(comp.flush())
    return b"".join(parts)


@pytest.mark.slow
def test_body_and_element_limits_stop_memory_blow_ups(limited_process: Server) -> None:
    """A subprocess: the test reads the server's peak memory."""
    port, pid = limited_process.port, limited_process.proc.pid
    assert call(port, "POST", "/v2/models/digits/infer", infer_body([DIGITS])).status == 200
    rss_before = rss_mb(pid)
    reset_hwm(pid)

    # a declared length of a terabyte, a few bytes sent: refused at once from the header, nothing read
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = request_bytes("POST", "/v2/models/digits/infer", b"", {"Content-Length": str(10**12)})
        sock.sendall(head + b'{"inputs":')
        r = read_reply(sock)
    assert r.status == 413, r.body

    # a chunked body that never declares its length: counted while read, refused past the limit
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        head = "POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close"
        sock.sendall(head.encode() + b"\r\n\r\n")
        chunk = b" " * 65536
        status = None
        try:
            for _ in range(64):  # up to 4 MiB offered, 1 MiB allowed
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed: what it answered is read below
        try:
            status = read_reply(sock).status
        except ConnectionError:
            status = None
    assert status == 413

    # a gzip bomb: 256 MiB of zeros in a 256 KB body; inflated only up to the limit
    bomb = gzip_bomb(256 << 20)
    assert len(bomb) < 1 << 20
    r = call(port, "POST", "/v2/models/digits/infer", bomb, {"Content-Encoding": "gzip"})
    assert r.status == 413 and "inflated" in r.json()["error"], r.body  # type: ignore[index]
    r = call(
        port, "POST", "/v2/models/digits/infer", gzip.compress(b"[" * ((1 << 20) + 1)), {"Content-Encoding": "gzip"}
    )
    assert r.status == 413

    # element limit: shapes above it are refused before any data is decoded
    for shape in ([1, 1, 8, 8000], [1 << 40], [1, 1, 1 << 31, 1 << 31]):
        tensor = {"name": "pixels", "shape": shape, "datatype": "FP32", "data": [0.0]}
        r = call(port, "POST", "/v2/models/digits/infer", infer_body([tensor]))
        assert r.status == 400 and "limit" in r.json()["error"], (shape, r.body)  # type: ignore[index]
    many = {"name": "pixels", "shape": [150_000], "datatype": "FP32", "data": [0] * 150_000}  # 450 KB of JSON
    r = call(port, "POST", "/v2/models/digits/infer", infer_body([many]))
    assert r.status == 400 and "limit" in r.json()["error"]  # type: ignore[index]
    r = raw(
        port, request_bytes("POST", "/v2/models/digits/infer", bytes(4000), {"Inference-Header-Content-Length": "0"})
    )
    assert r.status == 400  # a raw body of 1000 floats is 1000 elements: too many for [1,1,8,8]

    peak = hwm_mb(pid)
    assert peak - rss_before < 40, f"peak RSS {peak:.1f} MB, {peak - rss_before:.1f} MB above {rss_before:.1f} MB"
    assert call(port, "POST", "/v2/models/digits/infer", infer_body([DIGITS])).status == 200


# ------------------------------------------------------------------------------------------------ API key
def test_the_api_key_is_compared_in_constant_time() -> None:
    """service/dataplane.py compares the key only with secrets.compare_digest, never with == / != / in."""
    tree = ast.parse((ROOT / "service" / "dataplane.py").read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "compare_digest"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "secrets"
    ]
    assert calls, "service/dataplane.py does not call secrets.compare_digest"
    authorize = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == "authorize"
    )
    assert any(c in list(ast.walk(authorize)) for c in calls), "authorize() does not use compare_digest"
    secret_names = {"_api_key", "api_key", "token", "key"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        if names & secret_names:
            assert all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops), ast.unparse(node)
