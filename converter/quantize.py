"""Fold, then quantize to INT8, then prove it on real data (``bnfold convert --int8``, ``convert(int8=...)``).

1. The samples are read first and split: every fifth one (see :mod:`converter.quant_options`) is held out of
   calibration to prove the result, unless separate ``verify_inputs`` are given. No samples: refused (exit 2),
   unless random calibration was asked for (smoke tests; the report then says so at the top and the bottom).
2. The fold runs exactly as without INT8 (:func:`converter.core.run`, verified in float against the original).
3. ONNX Runtime's static quantization (``onnxruntime.quantization.quantize_static``: QDQ, int8 weights with one
   scale per output channel, activations ``uint8``/``int8``) calibrates the folded model on the samples.
4. The quantized model, run as it will be served (ONNX Runtime with its graph optimisations, which turn QDQ
   pairs into integer kernels), is compared with the original float model on the held-out samples
   (:mod:`converter.quant_report`): below the thresholds it is a :class:`VerificationError` (exit 3) and nothing
   is written.
5. It is written atomically, with ``bnfold.quantization`` in its metadata (the service shows it).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto

from converter import core, inputs, modelio, quant_report
from converter.core import ConversionResult, Source
from converter.errors import ConversionError, InputError, VerificationError, first_line
from converter.options import Options
from converter.quant_options import HOLD_OUT_EVERY, RANDOM_SAMPLES, Int8Options
from converter.quant_report import Int8Report
from converter.timing import Phases
from converter.verify import Feeds, InputSet, ModelSource, random_inputs, resolve_shapes, session

log = logging.getLogger("bnfold.converter")

#: The model metadata key that says a model is quantized, and how (read by the service's model metadata).
METADATA_KEY = "bnfold.quantization"
#: Ops that only a quantized model holds (QDQ, or ONNX Runtime's QOperator format and integer kernels).
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
)
#: Calibration sets smaller than this get a note: the ranges may miss what real inputs reach.
FEW_CALIBRATION_SAMPLES = 50


def run(src: Source, options: Options, phases: Phases, dst: Path | None) -> ConversionResult:
    """The fold (:func:`converter.core.run`: fold and verify the fold, in memory), then quantize, prove, write."""
    int8 = options.int8
    assert int8 is not None
    already = describe(src.model)
    if already is not None:
        raise InputError(f"the model is already quantized ({already}); INT8 quantization needs a float model")
    calibration, proof = _sample_sets(src.model, options, int8, phases)
    folded = core.run(src, replace(options, int8=None), phases)
    report = folded.report
    model = folded.model
    if calibration is None or proof is None:  # random calibration: the folded model fixes the shapes
        calibration, proof = _random_sets(model, options)
    with phases("quantize"):
        quantized = quantize(model, calibration.feeds, int8)
    info = Int8Report(
        activations=int8.activations,
        calibration=int8.calibration,
        calibrated_on=calibration.source,
        calibration_samples=len(calibration.feeds),
        random=not calibration.samples,
        min_top1=int8.min_top1,
        min_snr_db=int8.min_snr_db,
        bytes_float=model.ByteSize(),
        bytes_int8=quantized.ByteSize(),
    )
    report.int8 = info
    if calibration.samples and len(calibration.feeds) < FEW_CALIBRATION_SAMPLES:
        info.notes.append(
            f"only {len(calibration.feeds)} calibration samples: activation ranges may miss what real inputs "
            f"reach; a few hundred representative ones are better (docs/quantization.md)"
        )
    with phases("int8_layers"):
        folds = [(r.name, r.into_node) for r in report.folded if r.into_node is not None]
        info.layers = quant_report.layer_ranges(src.original(), model, folds)
    _describe(quantized, info)
    if options.verify:
        info.verified_on, info.verification_samples = proof.source, len(proof.feeds)
        with phases("verify_int8"):
            try:
                info.outputs = prove(src.reference, quantized, proof, int8)
            except VerificationError as exc:
                info.passed, report.seconds = False, phases.finish()
                raise VerificationError(str(exc), report) from None
        info.passed = all(o.passed for o in info.outputs)
        if not info.passed:
            report.seconds = phases.finish()
            raise VerificationError(f"INT8 verification failed: {info.failures()} on {proof.source}", report)
        log.info("INT8 model verified against the float model on %s", proof.source)
    if dst is not None:
        report.output = str(dst)
        with phases("save"), modelio.staged(dst) as stage:
            stage.write(quantized)
            stage.commit()
    report.seconds = phases.finish()
    return replace(folded, model=quantized)


def _sample_sets(
    model: ModelProto, options: Options, int8: Int8Options, phases: Phases
) -> tuple[InputSet | None, InputSet | None]:
    """(calibration, verification) from the sample files; (None, None) for random calibration."""
    if not options.inputs:
        return None, None
    with phases("inputs"):
        given = inputs.load(options.inputs, model)
        if int8.verify_inputs:
            proof = inputs.load(int8.verify_inputs, model)
            return given, proof
    n = len(given.feeds)
    if n < 2:
        raise InputError(
            "INT8 needs at least 2 samples (one calibrates, one is held out to verify), or separate "
            "verification samples (verify_inputs= in Python, --verify-inputs on the command line)"
        )
    held = set(range(HOLD_OUT_EVERY - 1, n, HOLD_OUT_EVERY)) or {n - 1}
    calibrate = [f for i, f in enumerate(given.feeds) if i not in held]
    verify = [f for i, f in enumerate(given.feeds) if i in held]
    what = ", ".join(options.inputs)
    return (
        InputSet(f"{len(calibrate)} samples from {what}", calibrate, samples=True),
        InputSet(f"{len(verify)} samples held out of {what} (every {HOLD_OUT_EVERY}th)", verify, samples=True),
    )


def _random_sets(model: ModelProto, options: Options) -> tuple[InputSet, InputSet]:
    """Seeded random inputs (standard normal floats): ``RANDOM_SAMPLES`` to calibrate, as many others to verify."""
    args = session(model).get_inputs()
    shapes = resolve_shapes(args, options.input_shapes)
    feeds = [random_inputs(args, shapes, options.seed + i) for i in range(2 * RANDOM_SAMPLES)]
    seed, n = options.seed, RANDOM_SAMPLES
    return (
        InputSet(f"{n} seeded random inputs (seeds {seed}-{seed + n - 1})", feeds[:n]),
        InputSet(f"{n} other seeded random inputs (seeds {seed + n}-{seed + 2 * n - 1})", feeds[n:]),
    )


class _Reader:
    """The samples for ONNX Runtime's calibration, one feed (one sample, batch of one) per ``get_next`` (the
    ``CalibrationDataReader`` protocol)."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


def quantize(model: ModelProto, feeds: Sequence[Feeds], int8: Int8Options) -> ModelProto:
    """ONNX Runtime's static quantization of ``model`` (QDQ, per-channel int8 weights), calibrated on ``feeds``."""
    # slow to import (~0.1 s), and only INT8 needs it
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    activation = QuantType.QUInt8 if int8.activations == "uint8" else QuantType.QInt8
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-") as tmp, _quiet_root_logger():
        src, out = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        with open(src, "wb") as f:  # a ModelProto given to ORT would get its weights moved to external data
            modelio.write_model(model, f)
        try:
            quantize_static(
                src,
                out,
                _Reader(feeds),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[int8.calibration],
            )
        except ConversionError:
            raise
        except Exception as exc:  # ORT raises many types for graphs it cannot quantize
            raise ConversionError(f"ONNX Runtime could not quantize the folded model: {first_line(exc)}") from None
        return onnx.load(str(out))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Drop the advice ``onnxruntime.quantization`` logs on the root logger ("consider pre-processing"): the
    folded model is what that pre-processing would produce, minus the inexact parts."""

    def keep(record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _describe(model: ModelProto, info: Int8Report) -> None:
    how = f"int8 {info.format}: activations {info.activations}, weights {info.weights}, calibration {info.calibration}"
    how += " on seeded random inputs (smoke test only)" if info.random else f" on {info.calibrated_on}"
    for prop in list(model.metadata_props):
        if prop.key == METADATA_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=METADATA_KEY, value=how)


def describe(model: ModelProto) -> str | None:
    """How ``model`` is quantized: what bnfold wrote into its metadata or, for a model quantized elsewhere, the
    quantization ops it holds; None for a float model."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return str(prop.value)
    ops = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx", "com.microsoft")} & QUANTIZED_OPS)
    return f"quantized ({', '.join(ops)})" if ops else None


def prove(
    reference: ModelSource, quantized: ModelProto, proof: InputSet, int8: Int8Options
) -> list[quant_report.OutputQuality]:
    """Every output of ``quantized`` (run with ONNX Runtime's optimisations, as served) against ``reference``
    (the float model, optimisations off) on ``proof``'s feeds."""
    sess = session(reference)
    names = [o.name for o in sess.get_outputs()]
    want = [[np.asarray(o) for o in sess.run(names, f)] for f in proof.feeds]
    del sess
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(quantized.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = [[np.asarray(o) for o in sess.run(names, f)] for f in proof.feeds]
    except Exception as exc:  # a quantized model ORT cannot run is a failed conversion
        raise VerificationError(f"the INT8 model does not run in ONNX Runtime: {first_line(exc)}") from None
    return [
        quant_report.output_quality(name, [g[j] for g in got], [w[j] for w in want], int8.min_top1, int8.min_snr_db)
        for j, name in enumerate(names)
    ]
