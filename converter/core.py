"""The conversion core: [read sample inputs] → rewrite (:mod:`converter.rewrite`) → verify → [write].

Every entry point (:mod:`converter.pipeline`) builds a :class:`Source` — the ONNX model to rewrite, the
unconverted model to compare with, and optionally a :class:`Framework` whose own outputs are a second
reference (PyTorch; any framework plugs in with a forward callable) — and hands it to :func:`run`. With a
destination, the output is staged beside it and renamed into place only after verification passed.
Verification failures raise :class:`VerificationError` (exit 3) after the trace has named the first diverging
node and the fold responsible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import ModelProto, TensorProto

from converter import inputs, modelio, prepare
from converter.errors import InputError, VerificationError, first_line
from converter.options import Options
from converter.report import Counts, Readiness, Report
from converter.rewrite import Rewrite, rewrite
from converter.timing import Phases
from converter.trace import first_divergence
from converter.verify import Checked, InputSet, ModelSource, Reference, Verification, verify

log = logging.getLogger("bnfold.converter")


@dataclass
class ConversionResult:
    model: ModelProto
    report: Report


@dataclass
class Framework:
    """A second reference: the source framework's own outputs (PyTorch; TensorFlow plugs in the same way)."""

    name: str  # "PyTorch": how error messages name it
    reference: Reference
    tolerances: tuple[float, float]  # the cross-framework default (atol, rtol) in float32
    phase: str  # the report's seconds key: "verify_pytorch"
    hint: Callable[[Report], str] = lambda report: ""  # added to a failure's message


@dataclass
class Source:
    """What the core converts: an ONNX model to rewrite in place, and what to verify the result against."""

    model: ModelProto
    name: str | None  # the report's source
    reference: ModelSource  # the unconverted ONNX model, run in ONNX Runtime
    label: str  # how the report names it: "the original model", "the exported ONNX model"
    original: Callable[[], ModelProto]  # an untouched copy of it, on demand (only training-mode BNs need it)
    framework: Framework | None = None
    notes: list[str] = field(default_factory=list)
    external_data: bool = False
    float16: bool = False  # the model computes in float16 (its float outputs are float16): float16 tolerances


def run(src: Source, options: Options, phases: Phases, dst: Path | None = None) -> ConversionResult:
    """The core: sample inputs, rewrite, report, verify (in memory, or the staged file when ``dst``), write.
    INT8 (``options.int8``) is a step above this one: :func:`converter.quantize.run` calls it, then quantizes."""
    samples: InputSet | None = None
    if options.verify and options.inputs:
        with phases("inputs"):
            samples = inputs.load(options.inputs, src.model)
    before = Counts.of(src.model)
    src.float16 = _float16_outputs(src.model)
    ir_version = src.model.ir_version
    with phases("rewrite"):
        constant_inputs = prepare.constant_initializer_inputs(src.model, options.keep_overridable_initializers)
        result = rewrite(src.model, options)
    report = _report(options, before, result)
    report.initializer_inputs = constant_inputs
    if constant_inputs:
        report.notes.append(prepare.initializer_note(constant_inputs, ir_version))
    report.source = src.name
    report.notes.extend(src.notes)
    reference = Reference.onnx(src.reference, src.label)
    if result.training and options.verify:
        reference = Reference.onnx(_inference_mode(src.original()), "the original in inference mode")
    if dst is None:
        if options.verify:
            _verify(report, options, phases, src, reference, result.model, samples)
        report.seconds = phases.finish()
        return ConversionResult(result.model, report)
    report.output = str(dst)
    with modelio.staged(dst) as stage:
        with phases("save"):
            stage.write(result.model, external_data=True if src.external_data else None)
        converted = ModelProto()
        src.model = converted  # the weights are on disk now; verification loads them from there
        del result
        if options.verify:
            _verify(report, options, phases, src, reference, stage.path, samples)
        stage.commit()
    report.seconds = phases.finish()
    return ConversionResult(converted, report)


def _report(options: Options, before: Counts, result: Rewrite) -> Report:
    report = Report(bn_mode=options.bn, fp16=options.fp16, layers=result.layers, before=before)
    report.after = Counts.of(result.model)
    report.readiness = Readiness.of(result.layers, options.fp16)
    if result.training:
        report.notes.append(
            f"{result.training} BatchNormalization node(s) were in training mode (batch statistics); converted "
            "to inference mode (running statistics); verification compares against the original with that same "
            "change"
        )
    return report


def _float16_outputs(model: ModelProto) -> bool:
    types = [o.type.tensor_type.elem_type for o in model.graph.output if o.type.HasField("tensor_type")]
    floats = [t for t in types if t in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)]
    return bool(floats) and all(t == TensorProto.FLOAT16 for t in floats)


def _inference_mode(original: ModelProto) -> ModelProto:
    """The original with training-mode BatchNorms switched to inference mode, and nothing else changed."""
    copy = ModelProto()
    copy.CopyFrom(original)
    return rewrite(copy, Options(bn="keep", verify=False)).model


def _verify(
    report: Report,
    options: Options,
    phases: Phases,
    src: Source,
    reference: Reference,
    converted: ModelSource,
    samples: InputSet | None,
) -> None:
    """Every check, ONNX Runtime first; the first failing reference raises VerificationError (exit 3)."""
    atol, rtol = options.tolerances(float16_model=src.float16)
    with phases("verify"):
        checked = _checked(report, reference, converted, atol, rtol, options, samples, "the models")
    feeds = checked.failing_feeds() or (
        (checked.sets[0].feeds[0], checked.sets[0].source) if options.trace and checked.sets[0].feeds else None
    )
    if feeds is not None:
        with phases("trace"):
            _trace(report, reference.model, converted, feeds, atol, rtol)
    _raise_if_failed(report, checked.results, atol, rtol, "verification failed")
    log.info("verified against %s", reference.label)
    fw = src.framework
    if fw is None:
        return
    atol, rtol = options.framework_tolerances(fw.tolerances)
    with phases(fw.phase):
        framework_samples = samples if fw.reference.forward is not None else None
        checked = _checked(report, fw.reference, converted, atol, rtol, options, framework_samples, "the model")
    what = f"verification against {fw.name} failed"
    _raise_if_failed(report, checked.results, atol, rtol, what, fw.hint(report))
    log.info("verified against %s", fw.reference.label)


def _checked(
    report: Report,
    reference: Reference,
    converted: ModelSource,
    atol: float,
    rtol: float,
    options: Options,
    samples: InputSet | None,
    what: str,
) -> Checked:
    try:
        checked = verify(
            reference,
            converted,
            atol=atol,
            rtol=rtol,
            input_shapes=options.input_shapes,
            seed=options.seed,
            samples=samples,
            random=options.random,
        )
    except InputError:
        raise
    except Exception as exc:  # ONNX Runtime refused a model: report it as a failed verification
        first = first_line(exc)
        raise VerificationError(f"verification could not run {what} in ONNX Runtime: {first}", report) from None
    report.add_verifications(checked.results)
    return checked


def _trace(
    report: Report,
    reference: ModelSource | None,
    converted: ModelSource,
    feeds: tuple[dict[str, Any], str],
    atol: float,
    rtol: float,
) -> None:
    if reference is None:
        return
    try:
        report.trace = first_divergence(reference, converted, feeds[0], atol=atol, rtol=rtol, inputs_from=feeds[1])
    except Exception as exc:  # the trace is a diagnosis; failing to run it must not hide the verdict
        log.warning("trace could not run: %s", first_line(exc))
        return
    d = report.trace.divergence
    if d is None:
        return
    for layer in report.layers:
        if layer.output == d.tensor or (layer.into_node is not None and layer.into_node == d.node):
            d.layer = layer.name
            d.fold = f"{layer.action} into {layer.into}" if layer.into else layer.action
            break


def _raise_if_failed(
    report: Report, results: list[Verification], atol: float, rtol: float, what: str, hint: str = ""
) -> None:
    worst = [o for v in results for o in v.outputs if not o.passed]
    if not worst:
        return
    names = ", ".join(
        f"{o.name} ({o.detail})"
        if o.nonfinite_original or o.nonfinite_converted
        else f"{o.name} (max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g})"
        for o in worst
    )
    where = ""
    if report.trace is not None and report.trace.divergence is not None:
        d = report.trace.divergence
        where = f"; first diverging node {d.node}" + (f" ({d.layer} {d.fold})" if d.layer else "")
    if any(o.nonfinite_original for o in worst):
        real = "inputs= in Python, --inputs on the command line"
        hint += f"; NaN/Inf in the original's outputs: verify on real inputs ({real}) instead of random ones"
    raise VerificationError(f"{what}: {names} above atol {atol:g} + rtol {rtol:g}{where}{hint}", report)
