"""How to quantize to INT8 after folding: :class:`Int8Options` (``convert(..., int8=...)``) and the matching
``bnfold convert --int8`` flags. Light on purpose: nothing here imports ``onnxruntime.quantization``.

Defaults (docs/quantization.md explains each):

- activations ``uint8`` (asymmetric; ONNX Runtime's U8S8 kernels, the fast path on x86 CPUs), weights always
  int8, symmetric, one scale per output channel, QDQ format;
- calibration ``minmax`` (the range every calibration sample covered; ``entropy`` and ``percentile`` clip
  outliers, need histograms of every activation, and are slower);
- every fifth sample (the 5th, 10th, ...; the last one when there are fewer than five) is held out of
  calibration and proves the result, unless ``verify_inputs`` gives separate samples;
- pass: top-1 agreement with the float model >= 0.99 for class scores, SNR >= 20 dB for every other output.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from converter.errors import InputError

ACTIVATIONS: tuple[str, ...] = ("uint8", "int8")
CALIBRATIONS: tuple[str, ...] = ("minmax", "entropy", "percentile")
MIN_TOP1 = 0.99
MIN_SNR_DB = 20.0
HOLD_OUT_EVERY = 5  # every fifth sample proves the quantized model instead of calibrating it
RANDOM_SAMPLES = 8  # seeded random inputs each for calibration and for verification (random_calibration only)


@dataclass(frozen=True)
class Int8Options:
    """INT8 quantization after the fold (ONNX Runtime static quantization, QDQ, per-channel int8 weights).

    ``verify_inputs``: sample files that prove the quantized model (default: every fifth of ``inputs``, which
    are then not calibrated on). ``min_top1``: least top-1 agreement with the float model for outputs that
    look like class scores (2-D float, at least 2 columns); ``min_snr_db``: least signal-to-noise ratio of
    every other output. ``random_calibration``: calibrate and verify on seeded random inputs when no samples
    are given (smoke tests only: the ranges then say nothing about real data).
    """

    activations: str = "uint8"
    calibration: str = "minmax"
    verify_inputs: tuple[str, ...] = field(default=())
    min_top1: float = MIN_TOP1
    min_snr_db: float = MIN_SNR_DB
    random_calibration: bool = False

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise InputError(f"INT8 activations must be one of {', '.join(ACTIVATIONS)}, not {self.activations!r}")
        if self.calibration not in CALIBRATIONS:
            raise InputError(f"calibration must be one of {', '.join(CALIBRATIONS)}, not {self.calibration!r}")
        if not 0 <= self.min_top1 <= 1:
            raise InputError(f"min_top1 must be between 0 and 1, not {self.min_top1!r}")
        if not self.min_snr_db == self.min_snr_db:  # NaN
            raise InputError("min_snr_db must be a number")
        paths = (self.verify_inputs,) if isinstance(self.verify_inputs, (str, os.PathLike)) else self.verify_inputs
        object.__setattr__(self, "verify_inputs", tuple(os.fspath(p) for p in paths))

    def check(self, inputs: tuple[str, ...], fp16: bool) -> None:
        """Refuse what cannot be quantized as asked: no samples to calibrate on, or float16 as well."""
        if fp16:
            raise InputError("INT8 quantizes the float32 model: leave out fp16 (--fp16)")
        if not inputs and not self.random_calibration:
            raise InputError(
                "INT8 needs real samples to calibrate on (inputs= in Python, --inputs on the command line: .npz, "
                ".npy or V2 request .json); random calibration (random_calibration=True, --random-calibration) "
                "is for smoke tests only"
            )
        if self.verify_inputs and not inputs:
            raise InputError("INT8 verification samples (--verify-inputs) need calibration samples (--inputs)")

    @classmethod
    def of(cls, value: bool | Int8Options | None) -> Int8Options | None:
        """``int8=`` of the Python entry points: False/None (no quantization), True (defaults) or options."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        raise InputError(f"int8 must be True, False or Int8Options, not {value!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--int8`` flags of ``bnfold convert``."""
    g = p.add_argument_group("INT8 (fold, then quantize; see docs/quantization.md)")
    g.add_argument(
        "--int8",
        action="store_true",
        help="after folding, quantize to INT8 (QDQ, per-channel int8 weights), calibrating on --inputs, and "
        "prove it against the float model on held-out samples (exit 3 below the thresholds, nothing written)",
    )
    g.add_argument(
        "--verify-inputs",
        action="append",
        metavar="FILE",
        help="with --int8: samples that prove the quantized model (default: every fifth of --inputs, held out "
        "of calibration); same formats as --inputs",
    )
    g.add_argument("--activations", choices=ACTIVATIONS, default="uint8", help="with --int8 (default uint8)")
    g.add_argument("--calibration", choices=CALIBRATIONS, default="minmax", help="with --int8 (default minmax)")
    g.add_argument(
        "--min-top1",
        type=float,
        default=MIN_TOP1,
        help=f"with --int8: least top-1 agreement with the float model for class scores (default {MIN_TOP1:g})",
    )
    g.add_argument(
        "--min-snr",
        type=float,
        default=MIN_SNR_DB,
        metavar="DB",
        help=f"with --int8: least signal-to-noise ratio of other outputs, in dB (default {MIN_SNR_DB:g})",
    )
    g.add_argument(
        "--random-calibration",
        action="store_true",
        help="with --int8 and no --inputs: calibrate on seeded random inputs (smoke tests only; the report says so)",
    )


def from_args(args: argparse.Namespace) -> Int8Options | None:
    """The parsed ``--int8`` flags, or None without ``--int8`` (then the other INT8 flags are refused)."""
    if not args.int8:
        given = [
            flag
            for flag, value, default in (
                ("--verify-inputs", args.verify_inputs, None),
                ("--activations", args.activations, "uint8"),
                ("--calibration", args.calibration, "minmax"),
                ("--min-top1", args.min_top1, MIN_TOP1),
                ("--min-snr", args.min_snr, MIN_SNR_DB),
                ("--random-calibration", args.random_calibration, False),
            )
            if value != default
        ]
        if given:
            raise InputError(f"{', '.join(given)} need --int8")
        return None
    return Int8Options(
        activations=args.activations,
        calibration=args.calibration,
        verify_inputs=tuple(args.verify_inputs or ()),
        min_top1=args.min_top1,
        min_snr_db=args.min_snr,
        random_calibration=args.random_calibration,
    )
