"""In CI (CI=true, which the test command installs the `tensorflow` extra for) a missing TensorFlow fails the run
instead of letting every test here skip; elsewhere the modules skip themselves without the extra."""

from __future__ import annotations

import importlib.util
import os

if os.environ.get("CI", "").lower() == "true":
    _missing = [name for name in ("tensorflow", "tf2onnx") if importlib.util.find_spec(name) is None]
    if _missing:
        raise RuntimeError(
            f"CI must run the TensorFlow tests, but {_missing} are not installed: pip install -e '.[tensorflow]'"
        )
