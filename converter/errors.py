"""Errors a user can cause, each with the exit code the CLI documents (docs/converting.md, exit codes)."""

from __future__ import annotations


class ConversionError(Exception):
    """The input cannot be converted as asked. The message is one line, meant for the user."""

    exit_code = 2


class InputError(ConversionError):
    """Missing, unreadable or invalid input file, or bad options."""


class VerificationError(ConversionError):
    """The converted model does not reproduce the original within tolerance; nothing was written.

    ``report`` is the conversion report (a :class:`converter.report.Report`) with the measured errors.
    """

    exit_code = 3

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


def shape_hint(name: str | None = None) -> str:
    """How to give input shapes, in the library's words and the command line's (their errors name both)."""
    if name is None:
        return "input_shapes=DIMS in Python, --input-shape DIMS on the command line"
    return f"input_shapes={{{name!r}: DIMS}} in Python, --input-shape {name}=DIMS on the command line"


def first_line(exc: BaseException) -> str:
    """An exception as one line for a user's error message: its first line (300 characters at most), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
