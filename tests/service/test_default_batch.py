"""A model of your own whose first dimension is dynamic takes batches without a config.json, as Triton's
auto-complete gives an ONNX model its default max batch size; the setting changes it; a config's wins."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from service.settings import BUNDLED_REPOSITORY
from tests.support.servers import in_process, save


def doubler(out_dims: list[int | str]) -> onnx.ModelProto:
    """x [batch, 2] -> x + x, its output declared with ``out_dims``."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "doubler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    save(doubler(["batch", 2]), tmp_path, "dynamic")  # every input and output: dynamic first dim
    save(doubler([2, 2]), tmp_path, "inputs_only")  # how the output follows the batch is not declared
    shutil.copytree(BUNDLED_REPOSITORY / "digits", tmp_path / "digits")
    return tmp_path


def rows(client: httpclient.InferenceServerClient, model: str, n: int) -> list[float]:
    x = httpclient.InferInput("x", [n, 2], "FP32")
    x.set_data_from_numpy(np.ones((n, 2), np.float32))
    return client.infer(model, [x]).as_numpy("y").ravel().tolist()  # type: ignore[no-any-return, union-attr]


def test_dynamic_first_dims_get_the_default_max_batch_size(repo: Path) -> None:
    with in_process(model_repository=repo) as server:
        c = httpclient.InferenceServerClient(server.address)
        assert c.get_model_config("dynamic")["max_batch_size"] == 8
        assert rows(c, "dynamic", 8) == [2.0] * 16
        with pytest.raises(InferenceServerException, match="max batch size is 8"):
            rows(c, "dynamic", 9)
        assert c.get_model_config("inputs_only")["max_batch_size"] == 1
        assert c.get_model_config("digits")["max_batch_size"] == 1  # its config.json says so


def test_the_setting_changes_the_default(repo: Path) -> None:
    with in_process(model_repository=repo, max_batch_size=3) as server:
        c = httpclient.InferenceServerClient(server.address)
        assert rows(c, "dynamic", 3) == [2.0] * 6
        with pytest.raises(InferenceServerException, match="max batch size is 3"):
            rows(c, "dynamic", 4)
        assert c.get_model_config("digits")["max_batch_size"] == 1
