"""Prove a conversion in ONNX Runtime: original vs converted on the same seeded random inputs.

Both models run with graph optimisations disabled (ORT_DISABLE_ALL), so the runtime's own Conv+BN fusion
cannot hide what the converter did. The sessions run one after the other, so only one model is resident.

An output passes when ``max|converted − original| ≤ atol + rtol·max|original|``: a norm-wise bound, scaled
by the output's own magnitude, so that elements near zero do not turn float32 rounding into a false alarm.
The reported relative error is that same ratio, ``max|Δ| / max|original|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import ModelProto

from converter.errors import InputError

#: Default tolerances (atol, rtol). float32: rtol 1e-4 is ~840 ulps of the output's magnitude; re-rounded folded
#: weights accumulate ~1e-5 through a ResNet-50-sized net (53 folds), while a wrong fold (wrong axis, wrong group,
#: wrong ε) shows up at 1e-2 and above. float16: what float16 weights and activations allow.
TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-6, 1e-4), "float16": (1e-3, 2e-2)}

ModelSource = str | Path | bytes | ModelProto
InputShapes = Mapping[str, Sequence[int]] | Sequence[int] | None

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    passed: bool
    detail: str = ""


@dataclass
class Verification:
    passed: bool
    atol: float
    rtol: float
    seed: int
    inputs: dict[str, list[int]]
    outputs: list[OutputCheck] = field(default_factory=list)
    reference: str = "the original model"


def session(model: ModelSource, providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An ORT session with every graph optimisation off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source: str | bytes
    if isinstance(model, ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, Path):
        source = str(model)
    else:
        source = model
    return ort.InferenceSession(source, options, providers=list(providers))


def resolve_shapes(inputs: Sequence[ort.NodeArg], requested: InputShapes) -> dict[str, list[int]]:
    """Concrete shapes for the model's inputs: static dims as declared, dynamic ones from ``requested``, else 1."""
    by_name: Mapping[str, Sequence[int]]
    if requested is None:
        by_name = {}
    elif isinstance(requested, Mapping):
        unknown = set(requested) - {i.name for i in inputs}
        if unknown:
            raise InputError(f"--input-shape names no input of the model: {', '.join(sorted(unknown))}")
        by_name = requested
    else:
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise InputError(f"the model has {len(inputs)} inputs ({names}); give --input-shape NAME=DIMS for each")
        by_name = {inputs[0].name: requested}
    shapes = {}
    for arg in inputs:
        declared = list(arg.shape) if arg.shape is not None else None
        given = by_name.get(arg.name)
        if given is None:
            if declared is None:
                raise InputError(f"input {arg.name!r} has no declared shape; give --input-shape {arg.name}=DIMS")
            shapes[arg.name] = [d if isinstance(d, int) and d >= 0 else 1 for d in declared]
            continue
        given = [int(d) for d in given]
        if declared is not None:
            if len(given) != len(declared):
                raise InputError(f"input {arg.name!r} has rank {len(declared)}, --input-shape gives {len(given)}")
            for axis, (g, d) in enumerate(zip(given, declared, strict=True)):
                if isinstance(d, int) and d >= 0 and g != d:
                    raise InputError(f"input {arg.name!r} has static dim {d} on axis {axis}, --input-shape gives {g}")
        if any(d < 0 for d in given):
            raise InputError(f"--input-shape for {arg.name!r} has a negative dim")
        shapes[arg.name] = given
    return shapes


def random_inputs(
    inputs: Sequence[ort.NodeArg], shapes: Mapping[str, Sequence[int]], seed: int
) -> dict[str, NDArray[np.generic]]:
    """Seeded values for each input: standard normal floats, small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, NDArray[np.generic]] = {}
    for arg in inputs:
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise InputError(f"input {arg.name!r} has type {arg.type}, which verification cannot generate")
        shape = tuple(shapes[arg.name])
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = np.asarray(rng.random(shape) < 0.5)
        elif dtype is np.str_:
            feeds[arg.name] = np.full(shape, "bnfold", dtype=object)
        else:
            feeds[arg.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def compare(name: str, got: NDArray[np.generic], want: NDArray[np.generic], atol: float, rtol: float) -> OutputCheck:
    if got.shape != want.shape:
        return OutputCheck(name, math.inf, math.inf, False, f"shape {got.shape} != {want.shape}")
    if not (np.issubdtype(want.dtype, np.floating) or np.issubdtype(got.dtype, np.floating)):
        equal = bool(np.array_equal(got, want))
        return OutputCheck(name, 0.0 if equal else math.inf, 0.0 if equal else math.inf, equal, "exact comparison")
    g64, w64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.array_equal(np.isnan(g64), np.isnan(w64)) or not np.array_equal(np.isinf(g64), np.isinf(w64)):
        return OutputCheck(name, math.inf, math.inf, False, "NaN or infinity in different places")
    finite = np.isfinite(w64)
    if np.any(np.isinf(w64)) and not np.array_equal(g64[~finite & ~np.isnan(w64)], w64[~finite & ~np.isnan(w64)]):
        return OutputCheck(name, math.inf, math.inf, False, "infinities of different sign")
    if not np.any(finite):
        return OutputCheck(name, 0.0, 0.0, True)
    diff = np.abs(g64[finite] - w64[finite])
    max_abs = float(diff.max())
    scale = float(np.abs(w64[finite]).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return OutputCheck(name, max_abs, max_rel, max_abs <= atol + rtol * scale)


def verify(
    original: ModelSource,
    converted: ModelSource,
    *,
    atol: float,
    rtol: float,
    input_shapes: InputShapes = None,
    seed: int = 0,
    reference: str = "the original model",
) -> Verification:
    """Run both models on the same inputs and compare every output of the original.

    An original that ONNX Runtime cannot run is the input's fault (InputError); a converted model that it cannot
    run is a failed conversion (raised as is, reported by the caller as a verification failure).
    """
    try:
        sess = session(original)
    except Exception as exc:  # ORT raises several unrelated types for models it refuses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise InputError(f"the original model does not run in ONNX Runtime: {first}") from None
    shapes = resolve_shapes(sess.get_inputs(), input_shapes)
    feeds = random_inputs(sess.get_inputs(), shapes, seed)
    names = [o.name for o in sess.get_outputs()]
    expected = sess.run(names, feeds)
    del sess
    sess = session(converted)
    cast_feeds = {
        arg.name: feeds[arg.name].astype(_ORT_TYPES.get(arg.type, np.float32)) if arg.name in feeds else None
        for arg in sess.get_inputs()
    }
    missing = [k for k, v in cast_feeds.items() if v is None]
    if missing:
        raise InputError(f"the converted model has inputs the original lacks: {', '.join(missing)}")
    got = sess.run(names, cast_feeds)
    del sess
    result = Verification(True, atol, rtol, seed, shapes, reference=reference)
    for name, g, w in zip(names, got, expected, strict=True):
        check = compare(name, np.asarray(g), np.asarray(w), atol, rtol)
        result.outputs.append(check)
        result.passed = result.passed and check.passed
    return result
