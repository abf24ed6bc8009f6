"""The ``bnfold`` command: ``serve`` lives here; ``convert`` and ``inspect`` come from the converter."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from converter import cli as converter_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnfold", description="Fold BatchNorm into ONNX weights, prove it exact, and serve the result."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{convert,inspect,serve}")
    converter_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    converter_cli.configure_logging()
    return converter_cli.run(args)
