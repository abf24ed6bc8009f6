"""The ten example digits of the web page (one per class), taken from the held-out split of the data set.

    python -m examples.digits.page_examples        # writes service/static/digits.json

The page shows them as "Example 0" … "Example 9" for the bundled ``digits`` model; each is the first held-out
image of its class, as raw pixel values 0..16 (row-major 8×8), the values the model takes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from examples.digits.data import load_split

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "service" / "static" / "digits.json"


def page_examples() -> dict[str, object]:
    split = load_split()
    examples = []
    for digit in range(10):
        index = int(np.flatnonzero(split.y_test == digit)[0])
        pixels = split.x_test[index].reshape(-1)
        examples.append({"label": digit, "pixels": [int(v) for v in pixels]})
    source = "sklearn.datasets.load_digits, held-out split"
    return {"model": "digits", "max": 16, "source": source, "examples": examples}


def render() -> str:
    return json.dumps(page_examples(), separators=(",", ":")) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits.page_examples", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
