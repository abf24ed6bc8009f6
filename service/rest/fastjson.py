"""Large JSON requests: parse with simdjson and copy float tensors' flat ``data`` straight into numpy.

With orjson a 1×3×224×224 FP32 tensor in JSON becomes 150,528 Python floats and then an array: ~23 ms of CPU,
ten times the inference. simdjson parses the same body and copies a numeric array into a buffer in ~6 ms.

The result must be exactly what the orjson path gives, so this path takes only what it handles identically and
answers None for everything else (the caller then parses with orjson, which also words the errors):
- a body under ``MIN_BYTES`` or over ``MAX_BYTES``, with any escape in a string (see the bracket check), or
  starting with a UTF-8 byte order mark (simdjson skips it, orjson refuses it);
- anything simdjson refuses (invalid JSON, integers beyond 64 bits, numbers out of range), whatever orjson
  then makes of it;
- an object with a repeated key (simdjson's lookup takes the first, orjson keeps the last);
- float ``data`` that is not a flat array of numbers (``as_buffer`` refuses booleans, strings and nulls, but
  flattens nested arrays: a flat array has exactly one ``[`` in the body, so the body's ``[`` count must equal
  the arrays and the ``[`` characters in strings that the rest of the request accounts for);
- a value of magnitude 2**53 or more (an integer there could round differently via float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import simdjson

#: Bodies below MIN_BYTES go to orjson (faster on them), and above MAX_BYTES too: on 16 MiB of one-digit numbers the
#: peak memory of this path is ~17 bytes per body byte against orjson's ~13 (on real float data it is lower: 35 vs
#: 51 MiB for 13.7 MB), so the largest bodies keep orjson's memory profile.
MIN_BYTES = 64 * 1024
MAX_BYTES = 16 * 1024 * 1024
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
_EXACT = 2.0**53


class _Unsure(Exception):
    """This request is not one the fast path handles exactly like orjson."""


def loads(body: bytes) -> dict[str, Any] | None:
    """``body`` as orjson would parse it, but with flat float ``data`` as float64 arrays; None: use orjson."""
    if not MIN_BYTES <= len(body) <= MAX_BYTES or b"\\" in body:  # one byte: memchr, ~0.1 ms for 3 MB
        return None
    if body.startswith(b"\xef\xbb\xbf"):  # simdjson skips a UTF-8 byte order mark; orjson refuses it
        return None
    try:
        doc = simdjson.Parser().parse(body)  # a parser per call: thread-safe, nothing outlives this function
        if not isinstance(doc, simdjson.Object):
            return None
        obj, arrays = _request(doc)
    except (_Unsure, ValueError, TypeError, RuntimeError):  # simdjson's errors: orjson decides, and words it
        return None
    if _count(body, b"[") != _brackets(obj) + arrays:
        return None  # a float data array had nested arrays in it
    return obj


def _request(doc: simdjson.Object) -> tuple[dict[str, Any], int]:
    obj: dict[str, Any] = {}
    arrays = 0
    for key in _keys(doc):
        value = doc[key]
        if key == "inputs" and isinstance(value, simdjson.Array):
            inputs = []
            for spec in value:
                if isinstance(spec, simdjson.Object):
                    parsed, found = _input(spec)
                    inputs.append(parsed)
                    arrays += found
                else:
                    inputs.append(_plain(spec))
            obj[key] = inputs
        else:
            obj[key] = _plain(value)
    return obj, arrays


def _input(spec: simdjson.Object) -> tuple[dict[str, Any], int]:
    keys = _keys(spec)
    datatype = spec["datatype"] if "datatype" in keys else None
    fast = isinstance(datatype, str) and datatype in FLOAT_TYPES
    out: dict[str, Any] = {}
    found = 0
    for key in keys:
        value = spec[key]
        if key == "data" and fast and isinstance(value, simdjson.Array):
            out[key] = _floats(value)
            found = 1
        else:
            out[key] = _plain(value)
    return out, found


def _floats(data: simdjson.Array) -> np.ndarray[Any, np.dtype[np.float64]]:
    values = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)  # a copy: outlives the parser
    if len(data) != values.size:
        raise _Unsure("nested arrays")
    if values.size and (values.max() >= _EXACT or values.min() <= -_EXACT):
        raise _Unsure("an integer could round differently")
    return values


def _count(body: bytes, byte: bytes, step: int = 1 << 16) -> int:
    """``body.count(byte)`` for one byte, vectorised: ~0.4 ms for 3 MB against bytes.count's ~1.7 ms.

    In 64 KiB slices, so that the comparison's temporaries stay below glibc's default mmap threshold (one 3 MB
    temporary is a fresh mapping, and its page faults cost more than the count, whatever BNFOLD_REUSE_LARGE_BUFFERS).
    """
    view = np.frombuffer(body, dtype=np.uint8)
    code = ord(byte)
    return sum(int(np.count_nonzero(view[i : i + step] == code)) for i in range(0, view.size, step))


def _keys(obj: simdjson.Object) -> list[str]:
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise _Unsure("repeated key")
    return keys


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _brackets(value: Any) -> int:
    """Arrays in ``value`` plus the ``[`` characters in its strings and keys (float arrays excluded)."""
    if isinstance(value, list):
        return 1 + sum(_brackets(v) for v in value)
    if isinstance(value, dict):
        return sum(k.count("[") + _brackets(v) for k, v in value.items())
    if isinstance(value, str):
        return value.count("[")
    return 0
