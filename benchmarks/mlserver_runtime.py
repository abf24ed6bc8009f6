"""A minimal MLServer custom runtime for ``benchmarks/serving.py``: one ONNX file in an ONNX Runtime session.

This module runs inside MLServer's own virtualenv (it imports ``mlserver``, which the project does not depend
on); ``benchmarks/serving.py`` copies it next to the generated ``model-settings.json`` files and puts that
folder on ``PYTHONPATH``. The session options come from the model settings' ``parameters.extra`` so the
benchmark gives MLServer exactly the options bnfold's runtime uses (see ``service/loading.py:load_model``).
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimeModel(MLModel):  # type: ignore[misc]
    """Loads ``parameters.uri`` (an ONNX file) into a CPU ``InferenceSession``; predict runs every output."""

    async def load(self) -> bool:
        uri = await get_model_uri(self._settings)
        extra: dict[str, Any] = {}
        if self._settings.parameters is not None and self._settings.parameters.extra:
            extra = dict(self._settings.parameters.extra)
        options = ort.SessionOptions()
        options.graph_optimization_level = OPT_LEVELS[extra.get("graph_optimization_level", "all")]
        options.intra_op_num_threads = int(extra.get("intra_op_num_threads", 0))
        options.inter_op_num_threads = int(extra.get("inter_op_num_threads", 1))
        options.log_severity_level = 3
        self._session = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        self._output_names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {inp.name: NumpyCodec.decode_input(inp) for inp in payload.inputs}
        results = self._session.run(self._output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(n, a) for n, a in zip(self._output_names, results, strict=True)],
        )
