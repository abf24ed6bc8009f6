"""An INT8 model serves like any ONNX model: fold-on-load has nothing to fold and skips it, and the model's
metadata says how it is quantized (bnfold's own description, or the quantization ops of a model made elsewhere)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter import convert, quantize
from service.settings import BUNDLED_REPOSITORY
from tests.support.servers import in_process

DIGITS = BUNDLED_REPOSITORY / "digits"


def int8_repository(tmp_path: Path, strip_metadata: bool = False) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(DIGITS, repo / "digits")
    model = convert(str(DIGITS / "1" / "model.onnx"), int8=True, inputs=[DIGITS / "samples.npz"]).model
    if strip_metadata:  # as if quantized by another tool
        del model.metadata_props[:]
    onnx.save(model, str(repo / "digits" / "1" / "model.onnx"))
    return repo


def pixels() -> np.ndarray:
    with np.load(DIGITS / "samples.npz") as archive:
        return np.asarray(archive["pixels"][:1])


def test_an_int8_model_serves_and_says_it_is_quantized(tmp_path: Path) -> None:
    repo = int8_repository(tmp_path)
    x = pixels()
    body = {"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with in_process(model_repository=repo, fold_on_load=True) as srv, srv.client() as http:
        meta = http.get("/v2/models/digits").json()["bnfold"]
        answer = http.post("/v2/models/digits/infer", json=body)
    assert meta["folded"] is None  # no BatchNorm left: fold-on-load skipped it
    assert meta["quantization"].startswith("int8 QDQ: activations uint8, weights int8")
    assert answer.status_code == 200, answer.text
    logits = np.asarray(answer.json()["outputs"][0]["data"], np.float32).reshape(1, 10)
    float_model = ort.InferenceSession(str(DIGITS / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert logits.argmax() == float_model.run(None, {"pixels": x})[0].argmax()


def test_a_model_quantized_elsewhere_is_recognised_by_its_ops(tmp_path: Path) -> None:
    with in_process(model_repository=int8_repository(tmp_path, strip_metadata=True)) as srv, srv.client() as http:
        meta = http.get("/v2/models/digits").json()["bnfold"]
    assert meta["quantization"] == "quantized (DequantizeLinear, QuantizeLinear)"


def test_a_float_model_is_not_quantized(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DIGITS, repo / "digits")
    with in_process(model_repository=repo) as srv, srv.client() as http:
        meta = http.get("/v2/models/digits").json()["bnfold"]
    assert meta["quantization"] is None and meta["folded"] is not None
    assert quantize.describe(onnx.load(str(DIGITS / "1" / "model.onnx"))) is None
