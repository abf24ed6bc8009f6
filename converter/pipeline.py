"""The conversion: load → normalise BatchNorms → fold (or keep, or make affine) → prune → [fp16] → verify → write.

``convert`` works on a model in memory and returns the converted model; ``convert_file`` works file to file
with a staged output that is renamed into place only after verification passed. PyTorch input (a TorchScript or
torch.export file, or ``convert_torch`` with an nn.Module) is first exported to ONNX by
:mod:`converter.torch_export`, and the result is verified twice: against the exported ONNX in ONNX Runtime, and
against PyTorch's own eval-mode outputs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from onnx import ModelProto

from converter import bn_modes, modelio, precision, rules, tf_export, tf_patterns, torch_export
from converter.errors import InputError, VerificationError
from converter.folding import cast_exact
from converter.graph import Graph, display_name, nested_nodes
from converter.report import Counts, LayerRecord, Report
from converter.shapes import Cast, ValueInfo
from converter.verify import TOLERANCES, InputShapes, ModelSource, verify

log = logging.getLogger("bnfold.converter")

BNMode = Literal["fold", "keep", "affine"]
BN_MODES: tuple[str, ...] = ("fold", "keep", "affine")
TRAINING_NOTE = "was in training mode (batch statistics); converted to inference mode (running statistics)"


@dataclass(frozen=True)
class Options:
    """How to convert. ``atol``/``rtol`` default to :data:`converter.verify.TOLERANCES` for the output dtype."""

    bn: str = "fold"
    verify: bool = True
    atol: float | None = None
    rtol: float | None = None
    input_shapes: InputShapes = None
    fp16: bool = False
    fp16_io: bool = False  # with fp16: float16 inputs and outputs too
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bn not in BN_MODES:
            raise InputError(f"--bn must be one of {', '.join(BN_MODES)}, not {self.bn!r}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise InputError(f"--{name} must be a non-negative number")
        if self.fp16_io and not self.fp16:
            raise InputError("--fp16-io needs --fp16")

    def tolerances(self) -> tuple[float, float]:
        atol, rtol = TOLERANCES["float16" if self.fp16 else "float32"]
        return (atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)


@dataclass
class ConversionResult:
    model: ModelProto
    report: Report


@dataclass
class Rewrite:
    model: ModelProto
    layers: list[LayerRecord]
    training: int  # BatchNorms that were in training mode and were switched to inference mode


def rewrite(model: ModelProto, options: Options) -> Rewrite:
    """Apply the conversion to ``model`` in place (fp16 returns a new model). No verification."""
    g = Graph(model)
    shapes = options.input_shapes if isinstance(options.input_shapes, Mapping) else None
    info = ValueInfo(model, shapes)
    cast = precision.fp16_cast if options.fp16 else cast_exact
    layers: dict[str, LayerRecord] = {}
    training = 0
    for bn in bn_modes.find(g):
        record = LayerRecord(bn.name, "BatchNormalization", "kept")
        if bn.training:
            record.notes.append(TRAINING_NOTE)
            training += 1
        bn_modes.normalise(g, bn)
        layers[bn.name] = record
    if options.bn in ("fold", "affine"):
        _fold_all(g, info, cast, layers)
    for idx, node in list(g.live_nodes()):
        if not bn_modes.is_batchnorm(node):
            continue
        bn = bn_modes.parse(g, idx)
        record = layers[bn.name]
        if options.bn == "keep":
            record.reason = "--bn keep"
        elif options.bn == "affine":
            why_not = bn_modes.to_affine(g, bn, info, cast)
            if why_not is None:
                record.action, record.reason = "affine", None
            else:
                record.reason = why_not
    g.prune()
    g.commit()
    _drop_stale_value_info(model)
    if options.fp16:
        precision.check_range(g)
        model = precision.to_fp16(model, keep_io_types=not options.fp16_io)
    return Rewrite(model, list(layers.values()), training)


def _fold_all(g: Graph, info: ValueInfo, cast: Cast, layers: dict[str, LayerRecord]) -> None:
    """Fold until nothing changes (a fold can make another possible: Conv → BN → BN)."""
    changed = True
    while changed:
        changed = False
        for idx, node in list(g.live_nodes()):
            if idx in g.removed:
                continue
            if bn_modes.is_batchnorm(node):
                bn = bn_modes.parse(g, idx)
                record = layers[bn.name]
                if bn.s is None or bn.t is None:
                    record.reason = bn.not_constant
                    continue
                affine = rules.Affine((idx,), bn.input, bn.output, bn.s, bn.t, bn.name)
                found = rules.match(g, affine, info)
                if isinstance(found, rules.Skip):
                    record.reason = found.reason
                    continue
            elif node.op_type in rules.CHAIN_PRODUCERS:
                chain = rules.chain_after(g, idx)
                if chain is None:
                    continue
                found = rules.match(g, chain, info)
                if isinstance(found, rules.Skip):
                    continue
                kind, _, name = chain.label.partition(" ")
                record = layers.setdefault(name, LayerRecord(name, kind, "kept"))
            else:
                continue
            producer = g.node(found.producer)
            record.action, record.reason = "folded", None
            record.into = f"{producer.op_type} {display_name(producer)}"
            found.rule.apply(g, found, cast)
            changed = True


def _drop_stale_value_info(model: ModelProto) -> None:
    """Remove value_info entries of values that no longer exist (a producer's renamed output)."""
    g = model.graph
    alive = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    stale = [vi for vi in g.value_info if vi.name not in alive]
    for vi in stale:
        g.value_info.remove(vi)


def _report(options: Options, before: Counts, result: Rewrite) -> Report:
    report = Report(bn_mode=options.bn, fp16=options.fp16, layers=result.layers, before=before)
    report.after = Counts.of(result.model)
    if result.training:
        report.notes.append(
            f"{result.training} BatchNormalization node(s) {TRAINING_NOTE}; verification compares against the "
            "original with that same change"
        )
    nested = sum(1 for n in nested_nodes(result.model.graph) if bn_modes.is_batchnorm(n))
    if nested:
        report.notes.append(
            f"{nested} BatchNormalization node(s) inside If/Loop/Scan bodies left as they are: subgraphs are not "
            "rewritten"
        )
    return report


def _reference(model: ModelProto, training: int, fallback: ModelSource) -> tuple[ModelSource, str]:
    """What verification compares with: the original, or it with training-mode BNs switched to inference."""
    if not training:
        return fallback, "the original model"
    copy = ModelProto()
    copy.CopyFrom(model)
    return rewrite(copy, Options(bn="keep", verify=False)).model, "the original in inference mode"


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
) -> ConversionResult:
    """Convert a model (a ModelProto, left untouched, or a path) in memory.

    Raises :class:`ConversionError` for input that cannot be converted and :class:`VerificationError` when
    the result does not reproduce the original within tolerance.
    """
    options = Options(bn, verify, atol, rtol, input_shapes, fp16, fp16_io, seed)
    start = time.perf_counter()
    if isinstance(model, ModelProto):
        modelio.check(model)
        original: ModelProto = model
        work = ModelProto()
        work.CopyFrom(model)
        source = None
    else:
        loaded = modelio.load(model)
        original, source = loaded.model, str(loaded.path)
        work = ModelProto()
        work.CopyFrom(original)
    before = Counts.of(work)
    result = rewrite(work, options)
    report = _report(options, before, result)
    report.source = source
    report.seconds["rewrite"] = time.perf_counter() - start
    if options.verify:
        reference, label = _reference(original, result.training, original)
        _verify(report, options, reference, result.model, label)
    report.seconds["total"] = time.perf_counter() - start
    return ConversionResult(result.model, report)


def convert_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    options: Options,
    *,
    in_place: bool = False,
) -> Report:
    """Convert ``src`` into ``dst`` (or into ``src`` itself with ``in_place``), atomically."""
    start = time.perf_counter()
    src_path = Path(src)
    if dst is None:
        if not in_place:
            raise InputError("give an output file (-o OUT) or --in-place")
        dst_path = src_path
    else:
        dst_path = Path(dst)
        if not in_place and dst_path.exists() and src_path.exists() and os.path.samefile(src_path, dst_path):
            raise InputError(f"{dst_path}: refusing to overwrite the input without --in-place")
    if in_place and (tf_export.sniff(src_path) is not None or torch_export.sniff(src_path) is not None):
        raise InputError(f"{src_path}: --in-place needs an ONNX input; give the output file with -o OUT.onnx")
    exported, loaded, reference = _load(src_path, options)
    if exported is not None:
        options = replace(options, input_shapes=exported.input_shapes)
    seconds = {"load" if exported is None else "export": time.perf_counter() - start}
    before = Counts.of(loaded.model)
    label = "the original model" if exported is None else "the exported ONNX model"
    tick = time.perf_counter()
    result = rewrite(loaded.model, options)
    if result.training and options.verify:
        original = modelio.load(src_path).model if isinstance(reference, Path) else _parse(reference)
        reference, label = _reference(original, result.training, reference)
    report = _report(options, before, result)
    report.source, report.output = str(src_path), str(dst_path)
    if exported is not None:
        report.notes.extend(exported.notes)
    seconds["rewrite"] = time.perf_counter() - tick
    with modelio.staged(dst_path) as stage:
        tick = time.perf_counter()
        stage.write(result.model, external_data=True if loaded.external_data else None)
        del loaded, result  # the weights are on disk now; verification loads them from there
        seconds["save"] = time.perf_counter() - tick
        if options.verify:
            tick = time.perf_counter()
            _verify(report, options, reference, stage.path, label)
            seconds["verify"] = time.perf_counter() - tick
            if exported is not None:
                tick = time.perf_counter()
                _verify_torch(report, options, exported, stage.path)
                seconds["verify_tensorflow" if exported.kind in tf_export.KINDS else "verify_pytorch"] = (
                    time.perf_counter() - tick
                )
        stage.commit()
    seconds["total"] = time.perf_counter() - start
    report.seconds = seconds
    return report


def inspect_model(src: str | os.PathLike[str] | ModelProto, options: Options | None = None) -> Report:
    """What a conversion would do, without verifying or writing anything."""
    options = replace(options or Options(), verify=False)
    exported: torch_export.Exported | None = None
    if isinstance(src, ModelProto):
        model, source = ModelProto(), None
        model.CopyFrom(src)
        modelio.check(model)
    else:
        exported, loaded, _ = _load(Path(src), options)
        model, source = loaded.model, str(loaded.path)
        if exported is not None:
            options = replace(options, input_shapes=exported.input_shapes)
    before = Counts.of(model)
    report = _report(options, before, rewrite(model, options))
    report.source = source
    if exported is not None:
        report.notes.extend(exported.notes)
    report.notes.append("inspect: nothing was verified or written")
    return report


def _load(src: Path, options: Options) -> tuple[torch_export.Exported | None, modelio.Loaded, ModelSource]:
    """An ONNX file, or a PyTorch or TensorFlow file exported to ONNX; and what ORT verification compares against."""
    tf_kind = tf_export.sniff(src)  # recognises the file without importing TensorFlow
    kind = torch_export.sniff(src) if tf_kind is None else None
    if tf_kind is None and kind is None:
        return None, modelio.load(src), src
    if tf_kind is not None:
        exported = tf_export.export_file(src, tf_kind, options.input_shapes, options.seed)
    else:
        assert kind is not None
        exported = torch_export.export_file(src, kind, options.input_shapes, options.seed)
    modelio.check(exported.model, f"{src} (exported to ONNX)")
    serialised = exported.model.SerializeToString()  # rewrite() changes exported.model in place
    if tf_kind is not None:
        _canonicalise_tf(exported)
    return exported, modelio.Loaded(exported.model, src, external_data=False), serialised


def _parse(data: ModelSource) -> ModelProto:
    model = ModelProto()
    if isinstance(data, ModelProto):
        model.CopyFrom(data)
    elif isinstance(data, bytes):
        model.ParseFromString(data)
    else:
        model = modelio.load(data).model
    return model


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
) -> ConversionResult:
    """Convert a PyTorch ``nn.Module`` (or ScriptModule, or ExportedProgram): export, fold, verify twice.

    ``example_inputs`` (a tensor or a tuple of tensors) fixes the ONNX input shapes and is what PyTorch's
    eval-mode outputs are computed on; the module's training flag is restored afterwards. Verification runs
    the ONNX Runtime comparison of :func:`convert` (seeded random inputs of the same shapes) and compares the
    converted model's outputs with PyTorch's (tolerance :data:`converter.torch_export.TOLERANCE` in float32).
    The other options are those of :func:`convert`. Needs the ``torch`` extra.
    """
    start = time.perf_counter()
    options = Options(bn, verify, atol, rtol, None, fp16, fp16_io, seed)  # bad options fail before the export
    exported = torch_export.export_module(module, example_inputs)
    export_seconds = time.perf_counter() - start
    result = convert(
        exported.model,
        bn=bn,
        verify=verify,
        atol=atol,
        rtol=rtol,
        input_shapes=exported.input_shapes,
        fp16=fp16,
        fp16_io=fp16_io,
        seed=seed,
    )
    report = result.report
    report.source = f"<{exported.kind} {type(module).__name__}>"
    report.notes.extend(exported.notes)
    report.seconds.pop("total", None)
    report.seconds = {"export": export_seconds, **report.seconds}
    if report.verification is not None and report.verification.reference == "the original model":
        report.verification.reference = "the exported ONNX model"
    if options.verify:
        tick = time.perf_counter()
        _verify_torch(report, options, exported, result.model)
        report.seconds["verify_pytorch"] = time.perf_counter() - tick
    report.seconds["total"] = time.perf_counter() - start
    return result


def torch_tolerances(options: Options) -> tuple[float, float]:
    """Tolerance of the PyTorch comparison: ``--atol``/``--rtol`` when given, else the cross-framework one
    (:data:`converter.torch_export.TOLERANCE`), or the float16 one with ``--fp16``."""
    atol, rtol = TOLERANCES["float16"] if options.fp16 else torch_export.TOLERANCE
    return (atol if options.atol is None else options.atol, rtol if options.rtol is None else options.rtol)


def _verify_torch(report: Report, options: Options, exported: torch_export.Exported, converted: ModelSource) -> None:
    if exported.kind in tf_export.KINDS:
        _verify_tf(report, options, exported, converted)
        return
    atol, rtol = torch_tolerances(options)
    try:
        check = torch_export.compare(exported, converted, atol=atol, rtol=rtol)
    except InputError:
        raise
    except Exception as exc:  # ONNX Runtime refused the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VerificationError(f"verification could not run the model in ONNX Runtime: {first}", report) from None
    report.extra_verifications.append(check)
    if not check.passed:
        worst = [o for o in check.outputs if not o.passed]
        names = ", ".join(f"{o.name} (max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g})" for o in worst)
        hint = ""
        if any(TRAINING_NOTE in note for layer in report.layers for note in layer.notes):
            hint = "; the PyTorch model runs BatchNorm in training mode (traced in train mode?): trace after .eval()"
        raise VerificationError(
            f"verification against PyTorch failed: {names} above atol {atol:g} + rtol {rtol:g}{hint}", report
        )
    log.info("verified %d outputs against %s", len(check.outputs), check.reference)


def _verify(report: Report, options: Options, reference: ModelSource, converted: ModelSource, label: str) -> None:
    atol, rtol = options.tolerances()
    try:
        report.verification = verify(
            reference,
            converted,
            atol=atol,
            rtol=rtol,
            input_shapes=options.input_shapes,
            seed=options.seed,
            reference=label,
        )
    except InputError:
        raise
    except Exception as exc:  # ONNX Runtime refused a model: report it as a failed verification
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VerificationError(f"verification could not run the models in ONNX Runtime: {first}", report) from None
    if not report.verification.passed:
        worst = [o for o in report.verification.outputs if not o.passed]
        names = ", ".join(f"{o.name} (max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g})" for o in worst)
        raise VerificationError(f"verification failed: {names} above atol {atol:g} + rtol {rtol:g}", report)
    log.info("verified %d outputs against %s", len(report.verification.outputs), label)


# --------------------------------------------------------------------------------------------------------
# TensorFlow/Keras in (converter.tf_export; TensorFlow is imported only when such an input arrives)


def _canonicalise_tf(exported: torch_export.Exported) -> None:
    """Move tf2onnx's per-channel Mul/Add next to the layer that absorbs them (exact; verified afterwards)."""
    counts = tf_patterns.canonicalise(exported.model)
    if any(counts.values()):
        exported.notes.append(
            f"TensorFlow forms rewritten for folding: {counts['moved']} Mul/Add moved before a layout op, "
            f"{counts['gemm']} MatMul(+bias) made Gemm"
        )


def tf_tolerances(options: Options) -> tuple[float, float]:
    """Tolerance of the TensorFlow comparison: ``--atol``/``--rtol`` when given, else
    :data:`converter.tf_export.TOLERANCE`, or the float16 one with ``--fp16``."""
    atol, rtol = TOLERANCES["float16"] if options.fp16 else tf_export.TOLERANCE
    return (atol if options.atol is None else options.atol, rtol if options.rtol is None else options.rtol)


def _verify_tf(report: Report, options: Options, exported: torch_export.Exported, converted: ModelSource) -> None:
    atol, rtol = tf_tolerances(options)
    try:
        check = tf_export.compare(exported, converted, atol=atol, rtol=rtol)
    except InputError:
        raise
    except Exception as exc:  # ONNX Runtime refused the model
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VerificationError(f"verification could not run the model in ONNX Runtime: {first}", report) from None
    report.extra_verifications.append(check)
    if not check.passed:
        worst = [o for o in check.outputs if not o.passed]
        names = ", ".join(f"{o.name} (max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g})" for o in worst)
        raise VerificationError(
            f"verification against TensorFlow failed: {names} above atol {atol:g} + rtol {rtol:g}", report
        )
    log.info("verified %d outputs against %s", len(check.outputs), check.reference)


def convert_keras(
    model: Any,
    input_signature: Any = None,
    *,
    bn: str = "fold",
    verify: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    fp16: bool = False,
    fp16_io: bool = False,
    seed: int = 0,
) -> ConversionResult:
    """Convert a Keras model: export with tf2onnx in inference mode, fold, verify twice.

    ``input_signature`` (a ``tf.TensorSpec`` or a list of them; default: the model's inputs) is the ONNX
    model's input signature, dynamic dims included; ``input_shapes`` fixes those dims for verification
    (default 1). Verification runs the ONNX Runtime comparison of :func:`convert` (the converted model against
    the exported one) and compares the converted model's outputs with TensorFlow's ``training=False`` outputs
    (tolerance :data:`converter.tf_export.TOLERANCE`). Needs the ``tensorflow`` extra.
    """
    start = time.perf_counter()
    options = Options(bn, verify, atol, rtol, None, fp16, fp16_io, seed)  # bad options fail before the export
    exported = tf_export.export_model(model, input_signature, input_shapes=input_shapes, seed=seed)
    modelio.check(exported.model, "the Keras model (exported to ONNX)")
    reference = exported.model.SerializeToString()
    _canonicalise_tf(exported)
    export_seconds = time.perf_counter() - start
    options = replace(options, input_shapes=exported.input_shapes)
    before = Counts.of(exported.model)
    result = rewrite(exported.model, options)
    report = _report(options, before, result)
    report.source = f"<{exported.kind} {type(model).__name__}>"
    report.notes.extend(exported.notes)
    report.seconds = {"export": export_seconds}
    if options.verify:
        tick = time.perf_counter()
        _verify(report, options, reference, result.model, "the exported ONNX model")
        _verify_tf(report, options, exported, result.model)
        report.seconds["verify"] = time.perf_counter() - tick
    report.seconds["total"] = time.perf_counter() - start
    return ConversionResult(result.model, report)
