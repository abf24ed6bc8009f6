"""Typed reads of a decoded JSON request: every field the server reads is checked where it is read.

A field of the wrong JSON type is a :class:`BadRequest` whose one-line message names the field by its path in
the request and the type expected, e.g. ``inputs[0].datatype must be a string, got an object``. An optional
field that is ``null`` counts as absent; a required one does not. A declared shape is checked (rank, signs,
element limit) by :func:`element_count` before anything is allocated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.errors import BadRequest

MAX_RANK = 32


def kind(value: object) -> str:
    """The JSON type of ``value``, with its article, as an error message shows it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a negative integer" if value < 0 else "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | np.ndarray):  # fastjson hands flat float arrays over as numpy
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def wrong(where: str, expected: str, value: object) -> BadRequest:
    return BadRequest(f"{where} must be {expected}, got {kind(value)}")


def at(where: str, key: str | int) -> str:
    """The path of ``key`` inside the field at ``where`` ('' is the request itself)."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise wrong(where, "an object", value)
    return value


def optional_obj(parent: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    """``parent[key]`` as an object; ``{}`` when absent or null."""
    value = parent.get(key)
    return {} if value is None else obj(value, at(where, key))


def array(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise wrong(where, "an array", value)
    return value


def string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise wrong(where, "a string", value)
    return value


def optional_string(parent: dict[str, Any], key: str, where: str = "") -> str | None:
    value = parent.get(key)
    return None if value is None else string(value, at(where, key))


def is_int(value: object) -> bool:
    """A JSON integer (Python's bool is an int, JSON's true is not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def integer(value: object, where: str) -> int:
    if not is_int(value):
        raise wrong(where, "an integer", value)
    assert isinstance(value, int)
    return value


def natural(value: object, where: str) -> int:
    """A non-negative integer."""
    if not is_int(value):
        raise wrong(where, "a non-negative integer", value)
    assert isinstance(value, int)
    if value < 0:
        raise BadRequest(f"{where} must be a non-negative integer, got {value}")
    return value


def optional_natural(parent: dict[str, Any], key: str, where: str = "") -> int | None:
    value = parent.get(key)
    return None if value is None else natural(value, at(where, key))


def optional_bool(parent: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = parent.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise wrong(at(where, key), "true or false", value)
    return value


def required(parent: dict[str, Any], key: str, where: str = "") -> object:
    """``parent[key]``; a missing key is a 400 naming it (a null one is left to the typed read to refuse)."""
    if key not in parent:
        raise BadRequest(f"{at(where, key)} is missing")
    return parent[key]


def element_count(name: str, shape: object, limit: int, where: str | None = None) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape; refuse element counts above ``limit`` before anything is allocated.

    ``where`` names the field in error messages (default: ``input '<name>' shape``).
    """
    where = where or f"input '{name}' shape"
    dims = array(shape, where)
    if len(dims) > MAX_RANK:
        raise BadRequest(f"input '{name}': shape of rank {len(dims)} is beyond the limit of {MAX_RANK}")
    for i, d in enumerate(dims):
        integer(d, at(where, i))
    if any(d < 0 for d in dims):
        raise BadRequest(f"input '{name}': shape {dims} has a negative dimension")
    if any(d > limit for d in dims):  # an empty tensor can still have absurd dims
        raise BadRequest(f"input '{name}': shape {dims} is beyond the limits")
    count = math.prod(dims)
    if count > limit:
        raise BadRequest(f"input '{name}': shape {dims} has {count} elements, above the limit of {limit}")
    return tuple(dims), count
