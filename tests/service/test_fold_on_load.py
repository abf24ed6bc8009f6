"""Fold-on-load reaches BatchNorms that only control-flow bodies hold: a model whose one BatchNorm sits in an If
branch is folded on load (the metadata says so), and the server answers as the original model does on both
branches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.support.servers import in_process, save

RNG = np.random.default_rng(7)
W = RNG.standard_normal((3, 2, 3, 3)).astype(np.float32)
X = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)


def batchnorm_in_a_branch() -> onnx.ModelProto:
    """``If(cond)``: then Conv -> BatchNormalization, else the Conv alone; the weight is the outer graph's."""
    bn = [
        numpy_helper.from_array(value.astype(np.float32), name)
        for name, value in (
            ("gamma", RNG.uniform(0.5, 1.5, 3)),
            ("beta", RNG.standard_normal(3)),
            ("mean", RNG.standard_normal(3)),
            ("var", RNG.uniform(0.5, 2.0, 3)),
        )
    ]
    out = [1, 3, 5, 5]
    then = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c_then"], pads=[1, 1, 1, 1], name="conv_then"),
            helper.make_node("BatchNormalization", ["c_then", "gamma", "beta", "mean", "var"], ["y_then"], name="bn"),
        ],
        "then",
        [],
        [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, out)],
        bn,
    )
    other = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c_else"], pads=[1, 1, 1, 1], name="conv_else")],
        "else",
        [],
        [helper.make_tensor_value_info("c_else", TensorProto.FLOAT, out)],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "branchy",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_a_batchnorm_only_inside_an_if_branch_is_folded_on_load(tmp_path: Path) -> None:
    original = batchnorm_in_a_branch()
    assert not any(n.op_type == "BatchNormalization" for n in original.graph.node)  # only the branch holds one
    repo = tmp_path / "repo"
    save(original, repo, "branchy")
    reference = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    with in_process(model_repository=repo, fold_on_load=True) as srv, srv.client() as http:
        folded = http.get("/v2/models/branchy").json()["bnfold"]["folded"]
        assert folded is not None, "fold-on-load skipped the model"
        assert [(f["name"], f["into"]) for f in folded["folded"]] == [("If(y)/then_branch/bn", "Conv conv_then")]
        assert folded["verification"]["passed"] is True
        for cond in (True, False):
            body = {
                "inputs": [
                    {"name": "cond", "shape": [], "datatype": "BOOL", "data": [cond]},
                    {"name": "x", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()},
                ]
            }
            answer = http.post("/v2/models/branchy/infer", json=body)
            assert answer.status_code == 200, answer.text
            (y,) = answer.json()["outputs"]
            want = reference.run(None, {"cond": np.array(cond), "x": X})[0]
            np.testing.assert_allclose(np.array(y["data"], np.float32).reshape(y["shape"]), want, rtol=1e-5, atol=1e-5)
