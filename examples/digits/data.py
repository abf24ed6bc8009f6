"""The 8×8 digits that ship inside scikit-learn (no download) and the fixed held-out split."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

TEST_SIZE = 0.25
SPLIT_SEED = 0


class Split(NamedTuple):
    x_train: NDArray[np.float64]  # (N, 1, 8, 8), raw pixel values 0..16
    x_test: NDArray[np.float64]
    y_train: NDArray[np.int64]
    y_test: NDArray[np.int64]


def load_split() -> Split:
    """``train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)`` with images as ``(N, 1, 8, 8)``."""
    digits = load_digits()
    x = np.asarray(digits.images, dtype=np.float64).reshape(-1, 1, 8, 8)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y)
    return Split(x_train, x_test, y_train, y_test)
