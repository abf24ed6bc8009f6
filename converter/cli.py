"""The ``convert`` and ``inspect`` commands (``bnfold convert``, ``python -m converter convert``).

The input is an ONNX file, or a PyTorch file (TorchScript from ``torch.jit.save``, ExportedProgram from
``torch.export.save``; recognised by content) that is exported to ONNX first and also verified against PyTorch,
or a Keras ``.keras``/``.h5`` file or SavedModel folder (verified against TensorFlow; see docs/tensorflow.md).

Exit codes: 0 success; 2 bad input or options (sample files included), or a model that cannot be converted as
asked; 3 verification failed (nothing written; the report names the first diverging node); 1 an internal error
(a bug: please report it with the traceback); 130 interrupted by SIGINT (Ctrl-C) and 143 by SIGTERM, the staged
output removed either way (128 + the signal number, as a shell reports a process the signal ended).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from converter import frontends, quant_options
from converter.errors import ConversionError, InputError, VerificationError, first_line
from converter.frontends import torch
from converter.modelio import staged
from converter.options import BN_MODES, Options
from converter.pipeline import convert_file, inspect_model
from converter.report import Report
from converter.verify import TOLERANCES, InputShapes

PROG = "bnfold"


def parse_shapes(values: Sequence[str] | None) -> InputShapes:
    """``1,3,224,224`` for a single-input model, or ``name=1,3,224,224`` (repeatable)."""
    if not values:
        return None
    named: dict[str, list[int]] = {}
    plain: list[list[int]] = []
    for text in values:
        name, sep, dims = text.rpartition("=")
        try:
            shape = [int(d) for d in dims.split(",")]
        except ValueError:
            raise InputError(f"--input-shape {text!r}: dims must be integers, as in 1,3,224,224") from None
        if not shape or any(d < 0 for d in shape):
            raise InputError(f"--input-shape {text!r}: give non-negative dims, as in 1,3,224,224")
        if sep:
            named[name] = shape
        else:
            plain.append(shape)
    if plain and (named or len(plain) > 1):
        raise InputError("--input-shape: name each shape (NAME=DIMS) when there are several")
    return plain[0] if plain else named


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input",
        help="ONNX model with BatchNormalization nodes, or a PyTorch TorchScript (.pt, torch.jit.save) or "
        "ExportedProgram (.pt2, torch.export.save) file (needs the torch extra), or a Keras .keras/.h5 file or "
        "TensorFlow SavedModel folder (needs the tensorflow extra)",
    )
    p.add_argument(
        "--bn",
        choices=BN_MODES,
        default="fold",
        help="fold: fold every foldable BN, keep the rest as inference BN (default); "
        "keep: only normalise BNs to inference mode; affine: fold, and rewrite the rest as Mul+Add",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="[NAME=]DIMS",
        help="shape for dynamic inputs, e.g. 1,3,224,224 or input=1,3,224,224 (repeatable); required for "
        "TorchScript, whose ONNX export gets exactly these (float32) input shapes",
    )
    p.add_argument("--fp16", action="store_true", help="write a float16 model (inputs and outputs stay float32)")
    p.add_argument("--fp16-io", action="store_true", help="with --fp16: float16 inputs and outputs too")
    p.add_argument(
        "--inputs",
        action="append",
        metavar="FILE",
        help="real inputs to verify on, each sample batch-of-one (repeatable): .npz with one array per model "
        "input (leading axis = samples), a .npy, a directory of them, or a V2 inference request .json",
    )
    p.add_argument("--no-random", action="store_true", help="with --inputs: skip the seeded random inputs")
    p.add_argument(
        "--keep-overridable-initializers",
        action="store_true",
        help="initializers also listed as graph inputs stay inputs a caller may override, so they are not folded "
        "(default: they are weights, folded and removed from the inputs)",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import this Python module (a name importable from the current directory, or a .py file) before "
        "loading the model: the module that registers a Keras model's custom layers (repeatable)",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="name the first node whose output differs between original and converted, even when verification "
        "passes (done anyway when it fails)",
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``convert`` and ``inspect`` on a subcommand parser."""
    f32, f16, pt = TOLERANCES["float32"], TOLERANCES["float16"], torch.TOLERANCE
    conv = sub.add_parser(
        "convert",
        help="fold BatchNorm into the preceding layer, verify in ONNX Runtime, write ONNX",
        description="Fold BatchNormalization into Conv/ConvTranspose/Gemm/MatMul weights, prove the result "
        "equal to the original in ONNX Runtime, and write it atomically. A PyTorch file is exported to ONNX "
        "first, and the result is also compared with PyTorch's eval-mode outputs. Exit codes: 0 ok, "
        "2 bad input, 3 verification failed (nothing written).",
    )
    _common(conv)
    conv.add_argument("-o", "--output", help="output ONNX file (required unless --in-place)")
    conv.add_argument("--in-place", action="store_true", help="overwrite the input file (after verification)")
    conv.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison (and the PyTorch one)")
    conv.add_argument(
        "--atol",
        type=float,
        help=f"absolute tolerance (default {f32[0]:g}; {f16[0]:g} with --fp16; {pt[0]:g} against PyTorch)",
    )
    conv.add_argument(
        "--rtol",
        type=float,
        help=f"tolerance relative to the output's largest magnitude (default {f32[1]:g}; {f16[1]:g} with --fp16; "
        f"{pt[1]:g} against PyTorch)",
    )
    conv.add_argument("--seed", type=int, default=0, help="seed of the random verification inputs (default 0)")
    conv.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    conv.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    quant_options.add_arguments(conv)
    conv.set_defaults(run=_run_convert)

    insp = sub.add_parser(
        "inspect",
        help="show what a conversion would do, without writing",
        description="Show which BatchNorms a conversion would fold, keep or rewrite, and why, and how ready the "
        "folded weights are for float16 and INT8. Writes nothing; verifies (exit 3 on failure) only with "
        "--inputs or --trace.",
    )
    _common(insp)
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.set_defaults(run=_run_inspect)


def import_modules(names: Sequence[str]) -> None:
    """``--import``: run each module (``pkg.mod`` from the current directory or the path, or a ``.py`` file) as
    ``python -m`` would find it, so that what it registers (Keras custom layers) exists before the model loads."""
    for name in names:
        module = name
        if name.endswith(".py"):
            path = Path(name)
            if not path.is_file():
                raise InputError(f"--import {name}: no such file")
            folder, module = str(path.resolve().parent), path.stem
        else:
            folder = os.getcwd()
        if folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise InputError(f"--import {name}: {type(exc).__name__}: {first_line(exc)}") from None


def _options(args: argparse.Namespace, verify: bool) -> Options:
    for name in ("atol", "rtol"):
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            raise InputError(f"--{name} must be a non-negative number")
    if args.fp16_io and not args.fp16:
        raise InputError("--fp16-io needs --fp16")
    if args.no_random and not args.inputs:
        raise InputError("--no-random needs --inputs")
    return Options(
        bn=args.bn,
        verify=verify,
        atol=getattr(args, "atol", None),
        rtol=getattr(args, "rtol", None),
        input_shapes=parse_shapes(args.input_shape),
        fp16=args.fp16,
        fp16_io=args.fp16_io,
        seed=getattr(args, "seed", 0),
        inputs=tuple(args.inputs or ()),
        random=not args.no_random,
        trace=args.trace,
        int8=quant_options.from_args(args) if hasattr(args, "int8") else None,
        keep_overridable_initializers=args.keep_overridable_initializers,
    )


class Terminated(BaseException):
    """SIGTERM arrived. Unwinds like KeyboardInterrupt (no ``except Exception`` stops it), so every staged output
    is removed on the way out."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While converting, SIGTERM (``timeout``, a CI cancel, ``kill``) raises :class:`Terminated` as Ctrl-C raises
    KeyboardInterrupt; a second SIGTERM during the clean-up is ignored. Python delivers the signal once a running
    ONNX Runtime or protobuf call returns. (Only the main thread can set a handler: elsewhere this does nothing.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_convert(args: argparse.Namespace) -> int:
    with sigterm_unwinds():
        return _convert(args)


def _convert(args: argparse.Namespace) -> int:
    if args.output is None and not args.in_place:
        raise InputError("give an output file with -o OUT, or --in-place to overwrite the input")
    options = _options(args, verify=not args.no_verify)
    import_modules(args.imports or ())
    src = Path(args.input)
    if args.output is not None and not args.in_place:
        out = Path(args.output)
        if out.exists() and src.exists() and os.path.samefile(src, out):
            raise InputError(f"{out}: refusing to overwrite the input without --in-place")
    if args.in_place and frontends.recognise(src) is not None:
        raise InputError(f"{src}: --in-place needs an ONNX input; give the output file with -o OUT.onnx")
    try:
        report = convert_file(args.input, args.output, options, in_place=args.in_place)
    except VerificationError as exc:
        if isinstance(exc.report, Report):
            sys.stderr.write(exc.report.to_text())
        raise
    if args.report:
        _write_text(Path(args.report), report.to_json())
    if not args.quiet:
        sys.stdout.write(report.to_text())
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    options = _options(args, verify=True)
    import_modules(args.imports or ())
    try:
        report = inspect_model(args.input, options)
    except VerificationError as exc:
        if isinstance(exc.report, Report):
            sys.stdout.write(exc.report.to_json() if args.json else exc.report.to_text())
        raise
    sys.stdout.write(report.to_json() if args.json else report.to_text())
    return 0


def _write_text(path: Path, text: str) -> None:
    with staged(path) as stage:
        stage.path.write_text(text)
        stage.commit()


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; user errors become one line on stderr and their exit code."""
    try:
        code: int = args.run(args)
        return code
    except ConversionError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Terminated:
        sys.stderr.write(f"{PROG}: terminated\n")
        return 128 + signal.SIGTERM


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m converter {convert,inspect} ...``"""
    parser = argparse.ArgumentParser(prog=PROG, description="Fold BatchNorm into ONNX weights, exactly.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    args = parser.parse_args(argv)
    configure_logging()
    return run(args)
