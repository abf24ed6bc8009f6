"""Real inputs for verification: sample files read, checked against the model's inputs, split into samples.

Formats (each path given to ``--inputs``/``inputs=``; several are concatenated):

- ``.npz``: one array per model input, named after it. The leading axis indexes samples and stands for the
  batch axis: an input declared ``[N, 1, 8, 8]`` takes an ``[S, 1, 8, 8]`` array, a fixed ``[1, 20]`` input an
  ``[S, 20]`` or ``[S, 1, 20]`` one. Every array of a file has the same S.
- ``.npy``: the samples of one input: named ``<input>.npy``, or any name for a single-input model.
- ``.json``: a V2 (Open Inference Protocol) inference request, ``{"inputs": [{"name", "shape", "datatype",
  "data"}]}`` — what clients send the service; its batch axis indexes samples.
- a directory: every ``.npz``, ``.npy`` and ``.json`` file in it, in name order (``.npy`` files named after
  the inputs of a multi-input model are taken together).

Each sample runs batch-of-one. Problems with the files are :class:`InputError` (exit 2) with one line.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, helper

from converter.errors import InputError
from converter.errors import first_line as _first_line
from converter.verify import Feeds, InputSet

Array = NDArray[Any]

#: V2 datatypes (KServe/Triton names) and their numpy types.
V2_TYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
SUFFIXES = (".npz", ".npy", ".json")


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype[Any]
    dims: tuple[int | None, ...]  # None for a symbolic or unknown dim


def specs(model: ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers), with their declared types."""
    init = {t.name for t in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in init or not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError):
            dtype = np.dtype(np.float32)
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out.append(InputSpec(vi.name, dtype, dims))
    return out


def load(paths: Sequence[str | os.PathLike[str]], model: ModelProto | Sequence[InputSpec]) -> InputSet:
    """Read every path, check each array against the model's inputs (``model``'s graph inputs, or the given
    specs), and return one feed per sample."""
    inputs = specs(model) if isinstance(model, ModelProto) else list(model)
    feeds: list[Feeds] = []
    for path in paths:
        p = Path(path)
        for batch, what in _batches(p, inputs):
            feeds.extend(_split(batch, inputs, what))
    names = ", ".join(str(p) for p in paths)
    return InputSet(f"{len(feeds)} sample{'s' if len(feeds) != 1 else ''} from {names}", feeds, samples=True)


def _batches(p: Path, inputs: list[InputSpec]) -> list[tuple[dict[str, Array], str]]:
    if not p.exists():
        raise InputError(f"{p}: no such file or directory (the real inputs to verify on)")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise InputError(f"{p}: no .npz, .npy or .json files in this directory of real inputs")
        names = {i.name for i in inputs}
        named = [f for f in files if f.suffix.lower() == ".npy" and f.stem in names and len(inputs) > 1]
        out = [(_npy_group(named), f"{p}/*.npy")] if named else []
        out.extend(b for f in files if f not in named for b in _batches(f, inputs))
        return out
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return [(_npz(p), str(p))]
    if suffix == ".npy":
        if len(inputs) != 1 and p.stem not in {i.name for i in inputs}:
            raise InputError(f"{p}: the model has {len(inputs)} inputs; name each .npy file after one, or use .npz")
        name = p.stem if len(inputs) != 1 else inputs[0].name
        return [({name: _npy(p)}, str(p))]
    if suffix == ".json":
        return [(_v2_request(p), str(p))]
    raise InputError(f"{p}: real inputs must be an .npz, .npy or V2 request .json file")


def _npy(p: Path) -> Array:
    try:
        value = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{p}: not a readable .npy file ({_first_line(exc)})") from None
    return np.asarray(value)


def _npy_group(files: list[Path]) -> dict[str, Array]:
    return {f.stem: _npy(f) for f in files}


def _npz(p: Path) -> dict[str, Array]:
    try:
        with np.load(p, allow_pickle=False) as archive:
            return {k: np.asarray(archive[k]) for k in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{p}: not a readable .npz file ({_first_line(exc)})") from None


def _v2_request(p: Path) -> dict[str, Array]:
    try:
        body = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: not a readable JSON file ({_first_line(exc)})") from None
    tensors = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(tensors, list):
        raise InputError(f'{p}: not a V2 inference request (no "inputs" list)')
    out: dict[str, Array] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not all(k in t for k in ("name", "shape", "datatype", "data")):
            raise InputError(f"{p}: inputs[{i}] needs name, shape, datatype and data (binary data is not read)")
        dtype = V2_TYPES.get(str(t["datatype"]))
        if dtype is None:
            known = ", ".join(V2_TYPES)
            raise InputError(f"{p}: input {t['name']!r} has datatype {t['datatype']!r}; expected one of {known}")
        try:
            shape = [int(d) for d in t["shape"]]
            value = np.asarray(t["data"], dtype=dtype).reshape(shape)
        except (TypeError, ValueError) as exc:
            why = _first_line(exc)
            raise InputError(f"{p}: input {t['name']!r}: data does not fit shape {t['shape']} ({why})") from None
        out[str(t["name"])] = value
    return out


def _split(batch: Mapping[str, Array], inputs: list[InputSpec], what: str) -> list[Feeds]:
    """One feed per sample (leading axis), each batch-of-one in the declared rank."""
    by_name = {i.name: i for i in inputs}
    unknown = sorted(set(batch) - set(by_name))
    if unknown:
        raise InputError(f"{what}: {', '.join(unknown)} names no input of the model ({', '.join(by_name)})")
    missing = [n for n in by_name if n not in batch]
    if missing:
        raise InputError(f"{what}: no array for model input(s) {', '.join(missing)}")
    counts: dict[str, int] = {}
    ready: dict[str, Array] = {}
    for name, value in batch.items():
        spec = by_name[name]
        ready[name] = _check(value, spec, what)
        counts[name] = ready[name].shape[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n} {c}" for n, c in counts.items())
        raise InputError(f"{what}: arrays hold different numbers of samples ({listed})")
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise InputError(f"{what}: no samples (empty arrays)")
    return [{name: value[i] for name, value in ready.items()} for i in range(count)]


def _check(value: Array, spec: InputSpec, what: str) -> Array:
    """``value`` as [S, 1, *dims[1:]] (one batch-of-one per sample) in the input's dtype, or an InputError."""
    rank = len(spec.dims)
    where = f"{what}: input {spec.name!r}"
    if value.dtype.kind not in "biuf":
        raise InputError(f"{where}: dtype {value.dtype} is not numeric; the model takes {spec.dtype}")
    if value.dtype.kind == "f" and spec.dtype.kind in "biu":
        raise InputError(f"{where}: float data ({value.dtype}) for an integer input ({spec.dtype})")
    if value.dtype.kind in "iu" and spec.dtype.kind == "b":
        raise InputError(f"{where}: integer data ({value.dtype}) for a boolean input")
    if rank == 0:
        raise InputError(f"{where}: a scalar input has no batch axis to take samples along")
    if value.ndim == rank:
        value = value.reshape(value.shape[0], 1, *value.shape[1:])  # [S, …] -> [S, 1, …]
    elif value.ndim != rank + 1 or value.shape[1] != 1:
        raise InputError(
            f"{where}: shape {list(value.shape)} does not fit {_dims(spec.dims)} "
            f"(give [samples, {', '.join(_dim(d) for d in spec.dims[1:])}])"
        )
    if spec.dims[0] is not None and spec.dims[0] != 1:
        raise InputError(f"{where}: the model's batch axis is fixed at {spec.dims[0]}; samples run one at a time")
    sample = value.shape[2:]
    for axis, (got, want) in enumerate(zip(sample, spec.dims[1:], strict=True), start=1):
        if want is not None and got != want:
            shape = list(value.shape)
            raise InputError(f"{where}: shape {shape}: axis {axis} of a sample is {got}, the model takes {want}")
    return np.ascontiguousarray(value, dtype=spec.dtype)


def _dims(dims: tuple[int | None, ...]) -> str:
    return "[" + ", ".join(_dim(d) for d in dims) + "]"


def _dim(d: int | None) -> str:
    return "?" if d is None else str(d)
