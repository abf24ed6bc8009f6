"""Ranks and element types of the values of a model, from ONNX shape inference on a data-free skeleton.

The skeleton shares nothing with the model but node and type definitions: large initializers are copied as
type and dims only, so inference on a 100 MB model costs kilobytes, not another copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import ModelProto, TensorProto

from converter.graph import all_graphs

#: Casts a float64 result to the dtype a value is stored in; the third argument names the layer for errors.
Cast = Callable[[NDArray[np.float64], "np.dtype[np.floating] | type[np.floating]", str], NDArray[np.floating]]

_KEEP_DATA_BYTES = 4096  # small tensors keep their data: shape inference reads Reshape/Slice/... constants


def skeleton(model: ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ModelProto:
    sk = ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    sk.functions.extend(model.functions)
    g, src = sk.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        if t.data_location == TensorProto.EXTERNAL or t.ByteSize() > _KEEP_DATA_BYTES:
            light = TensorProto(name=t.name, data_type=t.data_type)
            light.dims.extend(t.dims)
            g.initializer.append(light)
        else:
            g.initializer.append(t)
    for vi in g.input:
        shape = (input_shapes or {}).get(vi.name)
        if shape is not None and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shape:
                dims.add().dim_value = int(d)
    return sk


class ValueInfo:
    """Element type and shape of each value whose type shape inference could derive."""

    def __init__(self, model: ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self._types: dict[str, onnx.TypeProto] = {}
        sk = skeleton(model, input_shapes)
        try:
            inferred = onnx.shape_inference.infer_shapes(sk, strict_mode=False, data_prop=True)
        except Exception:  # inference is advisory: values it cannot type simply stay unknown
            inferred = sk
        for g in all_graphs(inferred.graph):  # subgraph (If/Loop/Scan body) values too: names are model-wide
            for vi in [*g.input, *g.value_info, *g.output]:
                if vi.type.HasField("tensor_type") and vi.name not in self._types:
                    self._types[vi.name] = vi.type
        for t in model.graph.initializer:
            tp = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
            self._types.setdefault(t.name, tp)

    def elem_type(self, name: str) -> int | None:
        tp = self._types.get(name)
        return tp.tensor_type.elem_type or None if tp is not None else None

    def rank(self, name: str) -> int | None:
        tp = self._types.get(name)
        if tp is None or not tp.tensor_type.HasField("shape"):
            return None
        return len(tp.tensor_type.shape.dim)

    def shape(self, name: str) -> list[int | None] | None:
        """Static dims as ints, symbolic or unknown ones as None; None when even the rank is unknown."""
        tp = self._types.get(name)
        if tp is None or not tp.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else None for d in tp.tensor_type.shape.dim]

    def channel_layout(self, name: str, axis: int) -> tuple[int, int] | None:
        """``(channels, inner)`` of ``name`` for channel axis ``axis``: its size and the product of the dims after
        it, so that flat element ``f`` (row-major) lies in channel ``(f // inner) % channels``. None unless both
        are static. Two tensors of the same size with equal layouts put every element in the same channel."""
        dims = self.shape(name)
        if dims is None or not -len(dims) <= axis < len(dims):
            return None
        axis %= len(dims)
        after = dims[axis + 1 :]
        channels = dims[axis]
        if channels is None or any(d is None for d in after):
            return None
        return channels, int(np.prod([d for d in after if d is not None], dtype=np.int64))
