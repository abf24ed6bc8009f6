"""The conversion: load → [read sample inputs] → rewrite (:mod:`converter.rewrite`) → verify → write.

Every entry point builds a :class:`Source` (what to rewrite, what to compare with) and hands it to one core,
:func:`run`. ``convert`` works on a model in memory and returns the converted model; ``convert_file`` works
file to file with a staged output that is renamed into place only after verification passed. A model from
another framework (PyTorch: a TorchScript or torch.export file, or ``convert_torch`` with an nn.Module) is
first exported to ONNX, and the result is verified twice: against the exported ONNX in ONNX Runtime, and
against the framework's own outputs (a :class:`~converter.verify.Reference` built from a forward callable).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from onnx import ModelProto

from converter import bn_modes, inputs, modelio, torch_export
from converter.errors import InputError, VerificationError
from converter.graph import nested_nodes
from converter.options import BN_MODES, Options
from converter.report import Counts, Readiness, Report
from converter.rewrite import Rewrite, rewrite
from converter.timing import Phases
from converter.trace import first_divergence
from converter.verify import Checked, InputSet, ModelSource, Reference, Verification, verify

log = logging.getLogger("bnfold.converter")

__all__ = ["BN_MODES", "ConversionResult", "Options", "Source", "convert", "convert_file", "convert_torch"]


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


def run(src: Source, options: Options, phases: Phases, dst: Path | None = None) -> ConversionResult:
    """The core: sample inputs, rewrite, report, verify (in memory, or the staged file when ``dst``), write."""
    samples: InputSet | None = None
    if options.verify and options.inputs:
        with phases("inputs"):
            samples = inputs.load(options.inputs, src.model)
    before = Counts.of(src.model)
    with phases("rewrite"):
        result = rewrite(src.model, options)
    report = _report(options, before, result)
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
    nested = sum(1 for n in nested_nodes(result.model.graph) if bn_modes.is_batchnorm(n))
    if nested:
        report.notes.append(
            f"{nested} BatchNormalization node(s) inside If/Loop/Scan bodies left as they are: subgraphs are not "
            "rewritten"
        )
    return report


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
    atol, rtol = options.tolerances()
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
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
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
        log.warning("trace could not run: %s", (str(exc).strip().splitlines() or [type(exc).__name__])[0])
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
        hint += "; NaN/Inf in the original's outputs: verify on real inputs (--inputs) instead of random ones"
    raise VerificationError(f"{what}: {names} above atol {atol:g} + rtol {rtol:g}{where}{hint}", report)


# --------------------------------------------------------------------------------------------------------
# entry points


def _copy(model: ModelProto) -> ModelProto:
    copy = ModelProto()
    copy.CopyFrom(model)
    return copy


def _parsed(data: bytes) -> Callable[[], ModelProto]:
    def parse() -> ModelProto:
        model = ModelProto()
        model.ParseFromString(data)
        return model

    return parse


def convert(
    model: ModelProto | str | os.PathLike[str],
    *,
    bn: str = "fold",
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    fp16: bool = False,
    fp16_io: bool = False,
    seed: int = 0,
    inputs: Sequence[str | os.PathLike[str]] = (),
    random: bool = True,
    trace: bool = False,
) -> ConversionResult:
    """Convert a model (a ModelProto, left untouched, or a path) in memory.

    ``inputs``: sample files (``.npz``, a directory of ``.npy``/``.npz``, V2 request ``.json``) that
    verification also runs on, one sample at a time; ``random=False`` skips the seeded random inputs.
    ``trace``: look for the first diverging node even when verification passes.

    Raises :class:`ConversionError` for input that cannot be converted and :class:`VerificationError` when
    the result does not reproduce the original within tolerance.
    """
    options = Options(
        bn, verify, atol, rtol, input_shapes, fp16, fp16_io, seed, tuple(os.fspath(p) for p in inputs), random, trace
    )
    phases = Phases()
    with phases("load"):
        if isinstance(model, ModelProto):
            modelio.check(model)
            original, name = model, None
        else:
            loaded = modelio.load(model)
            original, name = loaded.model, str(loaded.path)
    src = Source(_copy(original), name, original, "the original model", lambda: original)
    return run(src, options, phases)


def convert_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    options: Options,
    *,
    in_place: bool = False,
) -> Report:
    """Convert ``src`` into ``dst`` (or into ``src`` itself with ``in_place``), atomically."""
    phases = Phases()
    src_path = Path(src)
    if dst is None:
        if not in_place:
            raise InputError("give an output file or convert in place")
        dst_path = src_path
    else:
        dst_path = Path(dst)
        if not in_place and dst_path.exists() and src_path.exists() and os.path.samefile(src_path, dst_path):
            raise InputError(f"{dst_path}: refusing to overwrite the input unless converting in place")
    if in_place and torch_export.sniff(src_path) is not None:
        raise InputError(f"{src_path}: converting in place needs an ONNX input; give an output file (.onnx)")
    source, options = _file_source(src_path, options, phases)
    return run(source, options, phases, dst_path).report


def inspect_model(src: str | os.PathLike[str] | ModelProto, options: Options | None = None) -> Report:
    """What a conversion would do, without writing anything; verified (in memory) only when ``options`` give
    sample ``inputs`` or ask for a ``trace``."""
    options = options or Options()
    options = replace(options, verify=bool(options.inputs) or options.trace)
    phases = Phases()
    if isinstance(src, ModelProto):
        modelio.check(src)
        source = Source(_copy(src), None, src, "the original model", lambda: src)
    else:
        source, options = _file_source(Path(src), options, phases)
    report = run(source, options, phases).report
    report.seconds = {}
    report.notes.append(
        "inspect: nothing was written" if options.verify else "inspect: nothing was verified or written"
    )
    return report


def _file_source(path: Path, options: Options, phases: Phases) -> tuple[Source, Options]:
    """An ONNX file as it is, or a PyTorch file exported to ONNX (with PyTorch as a second reference)."""
    kind = torch_export.sniff(path)
    if kind is None:
        with phases("load"):
            loaded = modelio.load(path)
        src = Source(
            loaded.model,
            str(path),
            path,
            "the original model",
            lambda: modelio.load(path).model,
            external_data=loaded.external_data,
        )
        return src, options
    with phases("export"):
        exported = torch_export.export_file(path, kind, options.input_shapes, options.seed)
        modelio.check(exported.model, f"{path} (exported to ONNX)")
    return _torch_source(exported, str(path)), replace(options, input_shapes=exported.input_shapes)


def _torch_source(exported: torch_export.Exported, name: str) -> Source:
    serialised = exported.model.SerializeToString()  # rewrite() changes exported.model in place
    reference = torch_export.reference(exported)
    framework = Framework("PyTorch", reference, torch_export.TOLERANCE, "verify_pytorch", _torch_hint)
    return Source(
        exported.model,
        name,
        serialised,
        "the exported ONNX model",
        _parsed(serialised),
        framework=framework,
        notes=list(exported.notes),
    )


def _torch_hint(report: Report) -> str:
    if report.training:
        return "; the PyTorch model runs BatchNorm in training mode (traced in train mode?): trace after .eval()"
    return ""


def convert_torch(
    module: Any,
    example_inputs: Any,
    *,
    bn: str = "fold",
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    fp16: bool = False,
    fp16_io: bool = False,
    seed: int = 0,
    inputs: Sequence[str | os.PathLike[str]] = (),
    random: bool = True,
    trace: bool = False,
) -> ConversionResult:
    """Convert a PyTorch ``nn.Module`` (or ScriptModule, or ExportedProgram): export, fold, verify twice.

    ``example_inputs`` (a tensor or a tuple of tensors) fixes the ONNX input shapes and is what PyTorch's
    eval-mode outputs are computed on; the module's training flag is restored afterwards. Verification runs
    the ONNX Runtime comparison of :func:`convert` (seeded random inputs of the same shapes, and ``inputs``)
    and compares the converted model's outputs with PyTorch's on the example inputs and ``inputs``
    (tolerance :data:`converter.torch_export.TOLERANCE` in float32). The other options are those of
    :func:`convert`. Needs the ``torch`` extra.
    """
    options = Options(
        bn, verify, atol, rtol, None, fp16, fp16_io, seed, tuple(os.fspath(p) for p in inputs), random, trace
    )
    phases = Phases()
    with phases("export"):
        exported = torch_export.export_module(module, example_inputs)
        modelio.check(exported.model)
    options = replace(options, input_shapes=exported.input_shapes)
    return run(_torch_source(exported, f"<{exported.kind} {type(module).__name__}>"), options, phases)


def torch_tolerances(options: Options) -> tuple[float, float]:
    """Tolerance of the PyTorch comparison: ``atol``/``rtol`` when given, else the cross-framework one
    (:data:`converter.torch_export.TOLERANCE`), or the float16 one with ``fp16``."""
    return options.framework_tolerances(torch_export.TOLERANCE)
