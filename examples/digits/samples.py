"""Write ``service/models/digits/samples.npz``: real inputs for verifying a conversion of the digits model.

The first 100 held-out images of the fixed split (:func:`examples.digits.data.load_split`), raw pixel values
0..16 as float32, in one array named after the model's input: ``pixels``, shape ``(100, 1, 8, 8)``. The
leading axis indexes samples. ``bnfold convert --inputs`` and the service's fold-on-load read it.

    python -m examples.digits.samples
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from examples.digits.data import load_split

PATH = Path(__file__).resolve().parents[2] / "service" / "models" / "digits" / "samples.npz"
COUNT = 100


def samples_npz() -> bytes:
    pixels = load_split().x_test[:COUNT].astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, pixels=pixels)
    return buffer.getvalue()


if __name__ == "__main__":
    PATH.write_bytes(samples_npz())
