"""The entry points: ``convert`` (a model in memory), ``convert_file`` (file to file, atomic), ``inspect_model``
(what a conversion would do), ``convert_torch`` (an nn.Module) and ``convert_keras`` (a Keras model). Each builds
a :class:`~converter.core.Source` and runs the one core, :func:`converter.core.run`.

A PyTorch or TensorFlow input (a file, or a model in memory) is first exported to ONNX by its front end
(:mod:`converter.frontends`), which builds the source: the result is verified twice, against the exported ONNX
in ONNX Runtime and against the framework's own inference-mode outputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from onnx import ModelProto

from converter import frontends, modelio, quantize
from converter.core import ConversionResult, Source
from converter.core import run as fold_and_verify
from converter.errors import InputError
from converter.frontends import tensorflow, torch
from converter.options import BN_MODES, Options
from converter.quant_options import Int8Options
from converter.report import Report
from converter.timing import Phases

__all__ = [
    "BN_MODES",
    "ConversionResult",
    "Options",
    "convert",
    "convert_file",
    "convert_keras",
    "convert_torch",
    "inspect_model",
]


def _copy(model: ModelProto) -> ModelProto:
    copy = ModelProto()
    copy.CopyFrom(model)
    return copy


def _options(arguments: Mapping[str, Any]) -> Options:
    """The one place where an entry point's keyword arguments become :class:`Options`: every argument named like an
    option field (``inputs`` as path strings). ``arguments`` is the entry point's ``locals()`` on entry."""
    given = {f.name: arguments[f.name] for f in fields(Options) if f.name in arguments}
    given["inputs"] = tuple(os.fspath(p) for p in given.get("inputs", ()))
    return Options(**given)


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
    int8: bool | Int8Options = False,
    keep_overridable_initializers: bool = False,
) -> ConversionResult:
    """Convert a model (a ModelProto, left untouched, or a path) in memory.

    ``inputs``: sample files (``.npz``, a directory of ``.npy``/``.npz``, V2 request ``.json``) that
    verification also runs on, one sample at a time; ``random=False`` skips the seeded random inputs.
    ``trace``: look for the first diverging node even when verification passes.
    ``keep_overridable_initializers``: initializers also listed as graph inputs stay inputs (not constants);
    by default they are read as weights and removed from the inputs. ``int8``: then quantize to INT8,
    calibrating on ``inputs`` and proving the result on held-out ones (True, or :class:`Int8Options`;
    :mod:`converter.quantize`).

    Raises :class:`ConversionError` for input that cannot be converted and :class:`VerificationError` when
    the result does not reproduce the original within tolerance.
    """
    options = _options(locals())
    phases = Phases()
    with phases("load"):
        if isinstance(model, ModelProto):
            src = _memory_source(model)
        else:
            loaded = modelio.load(model)
            original = loaded.model
            src = Source(_copy(original), str(loaded.path), original, "the original model", lambda: original)
            src.notes.extend(loaded.notes)
    return run(src, options, phases)


def _memory_source(model: ModelProto) -> Source:
    """A ModelProto to convert: a checked copy (sorted when its nodes are out of order); the model is untouched."""
    copy = _copy(model)
    notes = modelio.check_sorted(copy)
    return Source(copy, None, model, "the original model", lambda: model, notes=notes)


def convert_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    options: Options,
    *,
    in_place: bool = False,
    custom_objects: Mapping[str, Any] | None = None,
) -> Report:
    """Convert ``src`` into ``dst`` (or into ``src`` itself with ``in_place``), atomically. ``custom_objects``:
    ``{name: class}`` for the custom layers of a Keras file that are not registered in this process."""
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
    if in_place and frontends.recognise(src_path) is not None:
        raise InputError(f"{src_path}: converting in place needs an ONNX input; give an output file (.onnx)")
    source, options = _file_source(src_path, options, phases, custom_objects)
    return run(source, options, phases, dst_path).report


def inspect_model(
    src: str | os.PathLike[str] | ModelProto,
    options: Options | None = None,
    *,
    custom_objects: Mapping[str, Any] | None = None,
) -> Report:
    """What a conversion would do, without writing anything; verified (in memory) only when ``options`` give
    sample ``inputs`` or ask for a ``trace``. ``custom_objects``: as for :func:`convert_file`."""
    options = options or Options()
    options = replace(options, verify=bool(options.inputs) or options.trace)
    phases = Phases()
    if isinstance(src, ModelProto):
        source = _memory_source(src)
    else:
        source, options = _file_source(Path(src), options, phases, custom_objects)
    report = run(source, options, phases).report
    report.seconds = {}
    report.notes.append(
        "inspect: nothing was written" if options.verify else "inspect: nothing was verified or written"
    )
    return report


def _file_source(
    path: Path, options: Options, phases: Phases, custom_objects: Mapping[str, Any] | None = None
) -> tuple[Source, Options]:
    """An ONNX file as it is, or a PyTorch or TensorFlow file exported to ONNX by its front end (with that
    framework as a second reference). ``custom_objects``: Keras's, for a Keras file's unregistered layers."""
    recognised = frontends.recognise(path)  # recognises the file without importing any framework
    if recognised is None:
        with phases("load"):
            loaded = modelio.load(path)
        src = Source(
            loaded.model,
            str(path),
            path,
            "the original model",
            lambda: modelio.load(path).model,
            notes=loaded.notes,
            external_data=loaded.external_data,
        )
        return src, options
    frontend, kind = recognised
    with phases("export"):
        if custom_objects is not None:
            if frontend is not tensorflow:
                raise InputError(f"{path}: custom_objects are Keras's, and this is not a Keras file")
            exported = tensorflow.export_file(path, kind, options.input_shapes, options.seed, custom_objects)
        else:
            exported = frontend.export_file(path, kind, options.input_shapes, options.seed)
        modelio.check(exported.model, f"{path} (exported to ONNX)")
    return frontend.source(exported, str(path)), replace(options, input_shapes=exported.input_shapes)


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
    int8: bool | Int8Options = False,
) -> ConversionResult:
    """Convert a PyTorch ``nn.Module`` (or ScriptModule, or ExportedProgram): export, fold, verify twice.

    ``example_inputs`` (a tensor or a tuple of tensors) fixes the ONNX input shapes and is what PyTorch's
    eval-mode outputs are computed on; the module's training flag is restored afterwards. Verification runs
    the ONNX Runtime comparison of :func:`convert` (seeded random inputs of the same shapes, and ``inputs``)
    and compares the converted model's outputs with PyTorch's on the example inputs and ``inputs``
    (tolerance :data:`converter.frontends.torch.TOLERANCE` in float32). The other options are those of
    :func:`convert`. Needs the ``torch`` extra.
    """
    options = _options(locals())
    phases = Phases()
    with phases("export"):
        exported = torch.export_module(module, example_inputs)
        modelio.check(exported.model)
    options = replace(options, input_shapes=exported.input_shapes)
    return run(torch.source(exported, f"<{exported.kind} {type(module).__name__}>"), options, phases)


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
    inputs: Sequence[str | os.PathLike[str]] = (),
    random: bool = True,
    trace: bool = False,
    int8: bool | Int8Options = False,
) -> ConversionResult:
    """Convert a Keras model: export with tf2onnx in inference mode, fold, verify twice.

    ``input_signature`` (a ``tf.TensorSpec`` or a list of them; default: the model's inputs) is the ONNX
    model's input signature, dynamic dims included; ``input_shapes`` fixes those dims for verification
    (default 1). Verification runs the ONNX Runtime comparison of :func:`convert` (the converted model against
    the exported one) and compares the converted model's outputs with TensorFlow's ``training=False`` outputs
    (tolerance :data:`converter.frontends.tensorflow.TOLERANCE`). Needs the ``tensorflow`` extra.
    """
    options = _options(locals())
    phases = Phases()
    with phases("export"):
        exported = tensorflow.export_model(model, input_signature, input_shapes=input_shapes, seed=seed)
        modelio.check(exported.model, "the Keras model (exported to ONNX)")
    options = replace(options, input_shapes=exported.input_shapes)
    return run(tensorflow.source(exported, f"<{exported.kind} {type(model).__name__}>"), options, phases)


def run(src: Source, options: Options, phases: Phases, dst: Path | None = None) -> ConversionResult:
    """The core (:func:`converter.core.run`); with ``options.int8``, the core then INT8
    (:func:`converter.quantize.run`)."""
    if options.int8 is not None:
        return quantize.run(src, options, phases, dst)
    return fold_and_verify(src, options, phases, dst)
