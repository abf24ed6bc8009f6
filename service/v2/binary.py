"""The binary tensor format both transports carry (REST's binary tensor data extension, gRPC's
``raw_input_contents`` / ``raw_output_contents``): little-endian, row-major; BOOL is one byte; a BYTES element
is a 4-byte little-endian length then its bytes. Sizes are checked against the bytes present before anything
is allocated."""

from __future__ import annotations

import struct

import numpy as np

from service.errors import BadRequest
from service.v2.datatypes import DATATYPES
from service.v2.tensors import Array

_LEN = struct.Struct("<I")


def decode_binary_data(name: str, datatype: str, shape: tuple[int, ...], count: int, buf: memoryview) -> Array:
    """Binary tensor bytes (exactly the tensor, nothing more) to an array; zero-copy for numeric types."""
    dtype = DATATYPES[datatype]
    if datatype == "BYTES":
        items: list[bytes] = []
        offset, end = 0, len(buf)
        while offset < end:
            if offset + 4 > end:
                raise BadRequest(f"input '{name}': BYTES element length is cut off")
            (length,) = _LEN.unpack_from(buf, offset)
            offset += 4
            if length > end - offset:
                raise BadRequest(f"input '{name}': BYTES element of {length} bytes overruns its data")
            items.append(bytes(buf[offset : offset + length]))
            offset += length
            if len(items) > count:
                break
        if len(items) != count:
            raise BadRequest(f"input '{name}': {len(items)} BYTES elements given, shape {list(shape)} needs {count}")
        return np.array(items, dtype=object).reshape(shape)
    expected = count * dtype.itemsize
    if len(buf) != expected:
        raise BadRequest(
            f"input '{name}': binary_data_size is {len(buf)} bytes, shape {list(shape)} of {datatype} needs {expected}"
        )
    if datatype == "BOOL":
        raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise BadRequest(f"input '{name}': BOOL bytes must be 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def binary_bytes(array: Array, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.ravel():
            data = item if isinstance(item, bytes) else str(item).encode()
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
