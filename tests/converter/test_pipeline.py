"""converter.pipeline's entry points: each keyword argument a user gives reaches the conversion's Options."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from converter import Options, convert, convert_keras, convert_torch, pipeline, zoo


@pytest.mark.parametrize("entry", [convert, convert_torch, convert_keras])
def test_every_keyword_of_an_entry_point_is_an_option(entry: Callable[..., Any]) -> None:
    keywords = {n for n, p in inspect.signature(entry).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert keywords <= {f.name for f in fields(Options)}


def test_convert_hands_each_keyword_to_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Options] = []
    monkeypatch.setattr(pipeline, "run", lambda source, options, phases: seen.append(options))
    given: dict[str, Any] = {
        "bn": "affine",
        "verify": False,
        "atol": 0.5,
        "rtol": 0.25,
        "input_shapes": [1, 3, 8, 8],
        "fp16": True,
        "fp16_io": True,
        "seed": 7,
        "random": False,
        "trace": True,
        "keep_overridable_initializers": True,
    }
    convert(zoo.FOLD_CASES[0].build(), inputs=[Path("samples.npz")], **given)
    assert seen == [Options(inputs=("samples.npz",), **given)]
