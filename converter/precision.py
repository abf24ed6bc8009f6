"""float16 output (``--fp16``): range checks first, then onnxconverter-common's graph conversion.

Folded tensors are rounded from float64 to float16 once, by the fold itself (see ``fp16_cast``); every other
float tensor is checked against float16's range (±65504) before conversion, so nothing is clipped silently.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, TensorProto, numpy_helper

from converter.errors import ConversionError
from converter.folding import F64, cast_exact
from converter.graph import Graph, display_name

FP16_MAX = float(np.finfo(np.float16).max)


def fp16_cast(value: F64, dtype: np.dtype[np.floating] | type[np.floating], what: str) -> NDArray[np.floating]:
    """Round a folded float32 tensor to float16 from float64 once, and hold it in float32 (exactly) until
    the graph conversion stores it as float16; other dtypes are cast as usual."""
    if np.dtype(dtype) == np.float32:
        return cast_exact(value, np.float16, what).astype(np.float32)
    return cast_exact(value, dtype, what)


def check_range(g: Graph) -> None:
    """Refuse a float32 constant that float16 cannot hold, naming it and the node that reads it."""
    for name, tensor in g.initializers.items():
        if tensor.data_type != TensorProto.FLOAT:
            continue
        _check(numpy_helper.to_array(tensor), name, g)
    for _, node in g.live_nodes():
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    _check(numpy_helper.to_array(attr.t), node.output[0], g)


def _check(value: NDArray[np.generic], name: str, g: Graph) -> None:
    finite = value[np.isfinite(value)]
    if finite.size and float(np.max(np.abs(finite))) > FP16_MAX:
        readers = [display_name(g.node(i)) for i in g.users(name) if i >= 0]
        where = f" (read by {', '.join(readers)})" if readers else ""
        raise ConversionError(
            f"{name}{where}: value {float(np.max(np.abs(finite))):.6g} overflows float16 (max {FP16_MAX:g})"
        )


def to_fp16(model: ModelProto, keep_io_types: bool) -> ModelProto:
    """Convert the graph's float32 tensors and types to float16; inputs/outputs stay float32 when asked."""
    from onnxconverter_common import float16  # noqa: PLC0415  (slow to import; only --fp16 needs it)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its clipping warnings cannot fire: check_range ran first
        converted: ModelProto = float16.convert_float_to_float16(
            model,
            min_positive_val=0.0,
            max_finite_val=FP16_MAX,
            keep_io_types=keep_io_types,
            check_fp16_ready=False,
        )
    return converted
