"""Real inputs for a model: ``DIR/<name>/samples.npz`` beside its version folders (the ``bnfold convert
--inputs`` .npz format). Fold-on-load verifies on them instead of random inputs, and warm-up runs them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from converter import ConversionError
from converter import inputs as sample_inputs
from service.errors import ModelLoadError
from service.v2.datatypes import DATATYPES
from service.v2.tensors import Array

SAMPLES_FILE = "samples.npz"


def samples_for(path: Path) -> Path | None:
    """The samples file of ``DIR/<name>/<version>/model.onnx``; None without one, or outside that layout."""
    candidate = path.parent.parent / SAMPLES_FILE
    if path.name == "model.onnx" and path.parent.name.isdigit() and candidate.is_file():
        return candidate
    return None


def sample_feeds(samples: Path, inputs: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[dict[str, Array]]:
    """One batch-of-one feed per sample, checked against the model's ``(name, V2 datatype, shape)`` inputs."""
    specs = [
        sample_inputs.InputSpec(name, DATATYPES[datatype], tuple(None if d < 0 else d for d in shape))
        for name, datatype, shape in inputs
    ]
    try:
        return sample_inputs.load([samples], specs).feeds
    except ConversionError as exc:
        raise ModelLoadError(f"{samples}: {exc}") from None
