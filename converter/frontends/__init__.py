"""Front ends: models of other frameworks exported to ONNX, with that framework as a second reference.

Each front end is a module implementing :class:`~converter.frontends.base.Frontend`: PyTorch
(:mod:`converter.frontends.torch`) and TensorFlow/Keras (:mod:`converter.frontends.tensorflow`, with the
rewrites of :mod:`converter.frontends.tensorflow_patterns`). Neither imports its framework until such an input
arrives. A new front end is a module with the same three functions, added to :data:`FRONTENDS`.
"""

from __future__ import annotations

from pathlib import Path

from converter.frontends import tensorflow, torch
from converter.frontends.base import Exported, Frontend

__all__ = ["FRONTENDS", "Exported", "Frontend", "recognise"]

#: The front ends, in the order they are asked to recognise a file; a file none recognises is ONNX.
FRONTENDS: tuple[Frontend, ...] = (tensorflow, torch)


def recognise(path: str | Path) -> tuple[Frontend, str] | None:
    """The front end whose file ``path`` is, and the file's kind; None for anything else (ONNX).

    Raises :class:`~converter.errors.InputError` for a file a front end recognises and refuses.
    """
    for frontend in FRONTENDS:
        kind = frontend.sniff(path)
        if kind is not None:
            return frontend, kind
    return None
