"""PyTorch in: TorchScript and torch.export files, and nn.Modules, exported to ONNX with BatchNorm intact.

Needs the ``torch`` extra (``pip install ".[torch]"``, in a clone: torch and onnxscript); this module imports torch
only when a PyTorch input actually arrives, so the rest of bnfold works without it.

Formats, recognised by the zip archive's layout (the content, not the suffix):

- TorchScript, written by ``torch.jit.save`` (``torch.jit.script(m).save(...)``, ``torch.jit.trace(...)``):
  ``<root>/code/`` and ``<root>/data.pkl``. Loaded with ``torch.jit.load``, whose unpickler only builds
  TorchScript classes and tensors. It records no input shapes: ``--input-shape`` is required.
- ExportedProgram, written by ``torch.export.save`` (``.pt2``): ``<root>/archive_format`` is ``pt2``. Loaded
  with ``torch.export.load`` after :func:`sniff` has checked, from the archive's JSON alone, that nothing in it
  would be unpickled (pickled weights or constants, custom or opaque objects, legacy weight files); its stored
  example inputs are loaded with ``weights_only=True`` first. Without ``--input-shape`` the program's stored
  example inputs are used.
- Refused with a one-line hint: ``torch.save`` pickles (a whole module or a state_dict, zip or legacy format).
  bnfold never unpickles arbitrary objects; export the model first (see :data:`PICKLE_HINT`).

Exporter settings, chosen so the exporter does not fold BatchNorm itself (silently, in float32, unverified)
and the parameters arrive as constants the converter can fold in float64 (node types seen with torch 2.13):

- nn.Module and TorchScript: ``torch.onnx.export(dynamo=False, do_constant_folding=False,
  training=TrainingMode.EVAL)`` → Conv, BatchNormalization, Gemm…, parameters as initializers (an Identity
  where two parameters are equal and get deduplicated; the converter follows it). The default
  ``do_constant_folding=True`` already folds Conv+BN (2 of 4 BatchNorms gone in a test net).
- ExportedProgram: ``torch.onnx.export(dynamo=True, optimize=False)``; the default ``optimize=True`` folds every
  BN via onnxscript. Unoptimised, a bias-free conv gets a computed zero bias (Shape → Expand → CastLike), which
  is no constant, so ``onnxscript.optimizer.fold_constants`` (constant folding only, no fusion rules) turns it
  into one; BatchNormalization nodes survive it untouched.

The module is run in eval mode (its training flag is restored afterwards) under ``torch.no_grad`` to get the
reference outputs; :func:`compare` then runs the converted ONNX model in ONNX Runtime (optimisations off) on
exactly those inputs. Random inputs are drawn like :func:`converter.verify.random_inputs` (standard normal,
``numpy.random.default_rng(seed)``, input by input), so they match the ORT verification's inputs.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import ModelProto

from converter.core import Framework, Source
from converter.errors import ConversionError, InputError, shape_hint
from converter.errors import first_line as _first_line
from converter.frontends.base import Exported, exported_source, reference
from converter.report import Report

log = logging.getLogger("bnfold.converter")

TORCHSCRIPT = "TorchScript"
EXPORTED_PROGRAM = "ExportedProgram"
MODULE = "nn.Module"

#: File names that mean "this should be a PyTorch file", whatever the content turns out to be.
TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ptl", ".jit", ".torchscript")
EXTRA = 'pip install ".[torch]" in a bnfold clone'
PICKLE_HINT = (
    "bnfold loads only TorchScript and torch.export files and never unpickles arbitrary objects; export it "
    "first: torch.jit.script(model).save('model.pt') (or torch.jit.trace(model, example).save('model.pt')), "
    "or torch.export.save(torch.export.export(model, (example,)), 'model.pt2')"
)

#: Tolerance (atol, rtol) of the PyTorch comparison in float32, same norm-wise test as the ORT one:
#: ``max|Δ| ≤ atol + rtol·max|torch|``. PyTorch (oneDNN) and ONNX Runtime (MLAS) use different conv/GEMM
#: kernels, so they do not agree to the last bit even before any fold. Measured with torch 2.13 CPU and
#: ORT 1.32 on 2 CPUs, trained-like BN statistics, 3-5 random inputs each, max|Δ|/max|torch| of the
#: converted model vs PyTorch: ResNet-18-sized (224², 1000 classes) 4.3e-7, same at 4×64² 4.9e-7,
#: ResNet-style 32² 1.5e-7, 20 conv-BN-ReLU layers (feature map output) 2.5e-7, ConvTranspose decoder
#: 2.5e-7, Conv1d 5.3e-7, Conv3d 6.3e-7; the unconverted export vs PyTorch is the same order (≤ 6.4e-7).
#: The error grows with depth: a ResNet-50-sized net (bottlenecks, 224², 53 BNs, random weights) gave
#: 1.0e-5 to 1.2e-5 (and ORT original vs converted 1.0e-5 to 1.3e-5). rtol 1e-4 leaves ~8× over that, and
#: still catches a fold that is off by a plausible bug (an ε of 1e-3 instead of 1e-5 moves outputs ~1e-3).
TOLERANCE: tuple[float, float] = (1e-5, 1e-4)

_LEGACY = "torch.onnx.export(dynamo=False, do_constant_folding=False, training=TrainingMode.EVAL)"
_DYNAMO = "torch.onnx.export(dynamo=True, optimize=False) + onnxscript fold_constants"

Array = NDArray[Any]


# --------------------------------------------------------------------------------------------------------
# recognising files (no torch needed)


def sniff(path: str | Path) -> str | None:
    """:data:`TORCHSCRIPT` or :data:`EXPORTED_PROGRAM` for a PyTorch file, None for anything else (ONNX).

    Raises :class:`InputError` for a PyTorch file bnfold refuses: a pickle, an archive that is corrupt or of
    another kind, or an ExportedProgram whose loading would unpickle something.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError:
        return None  # a missing or unreadable file: modelio.load says so
    is_zip = head == b"PK\x03\x04"
    if not is_zip and p.suffix.lower() not in TORCH_SUFFIXES:
        return None
    if not is_zip:
        if head[:1] == b"\x80":
            raise InputError(f"{p}: a pickled PyTorch object (torch.save); {PICKLE_HINT}")
        raise InputError(f"{p}: not a PyTorch file (no zip archive): expected torch.jit.save or torch.export.save")
    try:
        with zipfile.ZipFile(p) as archive:
            names = archive.namelist()
            root = _root(names)
            entries = {n[len(root) :] for n in names if n.startswith(root)}
            if "archive_format" in entries:
                fmt = archive.read(root + "archive_format").decode("utf-8", "replace").strip()
                if fmt != "pt2":
                    raise InputError(f"{p}: a PyTorch archive of format {fmt!r}; expected pt2 (torch.export.save)")
                _screen_pt2(p, archive, root, entries)
                return EXPORTED_PROGRAM
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError) as exc:
        raise InputError(f"{p}: corrupt or truncated PyTorch archive ({_first_line(exc)})") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if "data.pkl" in entries and any(e.startswith("code/") for e in entries):
        return TORCHSCRIPT
    if "data.pkl" in entries:
        raise InputError(f"{p}: a pickled PyTorch module or state_dict (torch.save); {PICKLE_HINT}")
    raise InputError(f"{p}: a zip archive, but not a TorchScript (torch.jit.save) or torch.export (.pt2) file")


def _root(names: Sequence[str]) -> str:
    """The archive's top folder (``name/``), which torch names after the file; '' when there is none."""
    firsts = {n.split("/", 1)[0] for n in names if "/" in n}
    return f"{firsts.pop()}/" if len(firsts) == 1 and all("/" in n for n in names) else ""


def _screen_pt2(p: Path, archive: zipfile.ZipFile, root: str, entries: set[str]) -> None:
    """Refuse a .pt2 archive that ``torch.export.load`` would unpickle (weights_only=False or pickle.loads)."""
    refuse = f"{p}: this torch.export archive stores pickled objects, which bnfold does not load"
    if not root:
        # torch.export.save puts everything in one folder; top-level files would reach torch.export.load's
        # fallback for the pre-2.7 format, which unpickles
        raise InputError(f"{p}: not laid out as torch.export.save writes it (one top folder)")
    models = _pt2_models(entries)
    if not models:
        raise InputError(f"{p}: a pt2 archive without an ExportedProgram (models/*.json)")
    if any(e.startswith("data/aotinductor/") for e in entries):
        raise InputError(f"{p}: an AOTInductor package; give the ExportedProgram (torch.export.save) instead")
    for model in models:
        if f"data/weights/{model}.pt" in entries or f"data/constants/{model}.pt" in entries:
            raise InputError(f"{refuse} (legacy weight format); re-save it with torch.export.save")
    configs = [f"data/{kind}/{model}_{kind}_config.json" for model in models for kind in ("weights", "constants")]
    for entry in configs:
        if entry not in entries:
            continue  # torch.export.load says what is missing
        config = json.loads(archive.read(root + entry))
        items = config.get("config", {}) if isinstance(config, dict) else None
        if not isinstance(items, dict) or not all(isinstance(meta, dict) for meta in items.values()):
            raise InputError(f"{p}: corrupt torch.export archive ({entry} is not a payload config)")
        for name, meta in items.items():
            path_name = str(meta.get("path_name", ""))
            if meta.get("use_pickle") or path_name.startswith(("custom_obj_", "opaque_obj_")):
                raise InputError(f"{refuse} ({name!r}); save plain dense tensors")


def _pt2_models(entries: set[str]) -> list[str]:
    return sorted(PurePosixPath(e).stem for e in entries if e.startswith("models/") and e.endswith(".json"))


def _check_sample_inputs(torch: Any, p: Path) -> None:
    """Load the stored example inputs as torch.export.load would, but never with ``weights_only=False``."""
    with zipfile.ZipFile(p) as archive:
        root = _root(archive.namelist())
        entries = {n[len(root) :] for n in archive.namelist()}
        for model in _pt2_models(entries):
            name = f"data/sample_inputs/{model}.pt"
            if name not in entries:
                continue
            data = archive.read(root + name)
            if not data:
                continue
            try:
                torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as exc:
                raise InputError(
                    f"{p}: the stored example inputs need unrestricted unpickling, which bnfold refuses "
                    f"({_first_line(exc)})"
                ) from None


# --------------------------------------------------------------------------------------------------------
# loading and exporting (torch from here on)


def _torch(what: str) -> Any:
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise InputError(f"{what} needs PyTorch, which is not installed: {EXTRA}") from None
    return torch


def _onnxscript(what: str) -> Any:
    try:
        import onnxscript.optimizer  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise InputError(f"{what} needs onnxscript, which is not installed: {EXTRA}") from None
    return onnxscript


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the exporter's progress lines, warnings and log chatter off the CLI's stdout/stderr."""
    chatter = io.StringIO()
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)
        if chatter.getvalue().strip():
            log.debug("exporter output:\n%s", chatter.getvalue().rstrip())


def export_file(
    path: str | Path, kind: str, input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None, seed: int
) -> Exported:
    """Load a file :func:`sniff` recognised and export it (``input_shapes`` as given to ``--input-shape``)."""
    p = Path(path)
    what = f"{p}: a {kind} file"
    torch = _torch(what)
    if kind == TORCHSCRIPT:
        try:
            with _quiet():
                module = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError and friends for any defect of the archive
            raise InputError(f"{p}: cannot load TorchScript ({_first_line(exc)})") from None
        if input_shapes is None:
            raise InputError(f"{p}: a TorchScript file records no input shapes; give them ({shape_hint()})")
        names = _forward_names(module, None)
        args = _random_inputs(torch, names, input_shapes, seed)
        exported = _export_module(torch, module, args, names, TORCHSCRIPT, f"seed {seed} random inputs")
        exported.seed = seed
        return exported
    _onnxscript(what)
    try:
        _check_sample_inputs(torch, p)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{p}: corrupt or truncated PyTorch archive ({_first_line(exc)})") from None
    try:
        # screened by sniff() and _check_sample_inputs(): nothing in it is unpickled
        with _quiet():
            program = torch.export.load(str(p))
    except Exception as exc:
        raise InputError(f"{p}: cannot load the ExportedProgram ({_first_line(exc)})") from None
    return export_program(program, None, input_shapes, seed, what=str(p))


def export_module(module: Any, example_inputs: Any) -> Exported:
    """Export an ``nn.Module`` (or ScriptModule, or ExportedProgram) with ``example_inputs`` (a tensor or tuple)."""
    torch = _torch("convert_torch")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise InputError("convert_torch: example_inputs must be a tensor or a tuple of tensors")
    args = tuple(a.detach().cpu() for a in args)
    if isinstance(module, torch.export.ExportedProgram):
        _onnxscript("convert_torch")
        return export_program(module, args, None, 0)
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"convert_torch: expected a torch.nn.Module, got {type(module).__name__}")
    names = _forward_names(module, len(args))
    kind = TORCHSCRIPT if isinstance(module, torch.jit.ScriptModule) else MODULE
    return _export_module(torch, module, args, names, kind, "the example inputs")


def _forward_names(module: Any, count: int | None) -> list[str]:
    """ONNX input names: the parameter names of ``forward`` (``x``), else ``input``, ``input1``, …"""
    names: list[str] = []
    try:
        schema = getattr(module.forward, "schema", None)
        if schema is not None:  # TorchScript: forward(self, Tensor x)
            names = [a.name for a in schema.arguments[1:]]
        else:
            params = inspect.signature(module.forward).parameters.values()
            names = [
                p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
            ]
    except (TypeError, ValueError, AttributeError):
        names = []
    if count is not None:
        names = names[:count] if len(names) >= count else []
        if not names:
            names = ["input"] + [f"input{i}" for i in range(1, count)]
    return names or ["input"]


def _random_inputs(
    torch: Any, names: list[str], shapes: Mapping[str, Sequence[int]] | Sequence[int], seed: int
) -> tuple[Any, ...]:
    """Seeded float32 inputs, drawn exactly as :func:`converter.verify.random_inputs` draws them."""
    if isinstance(shapes, Mapping):
        unknown = sorted(set(shapes) - set(names))
        if unknown:
            raise InputError(f"input shapes given for no input of forward({', '.join(names)}): {', '.join(unknown)}")
        missing = [n for n in names if n not in shapes]
        if missing:
            raise InputError(f"no shape given for these inputs of forward(): {', '.join(missing)}")
        by_name = shapes
    else:
        if len(names) != 1:
            each = shape_hint("NAME")
            raise InputError(f"forward() takes {len(names)} inputs ({', '.join(names)}); give each a shape ({each})")
        by_name = {names[0]: shapes}
    rng = np.random.default_rng(seed)
    return tuple(
        torch.from_numpy(rng.standard_normal(tuple(int(d) for d in by_name[n])).astype(np.float32)) for n in names
    )


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _run(torch: Any, fn: Any, args: tuple[Any, ...], what: str) -> list[Array]:
    try:
        with torch.no_grad():
            out = fn(*args)
    except Exception as exc:
        raise InputError(
            f"{what}: PyTorch cannot run it on inputs of shape {_shapes(args)} ({_first_line(exc)})"
        ) from None
    leaves = _flatten(torch, out)
    if not leaves:
        raise ConversionError(f"{what}: forward() returned no tensor")
    return [t.detach().cpu().numpy() for t in leaves]


def _flatten(torch: Any, out: Any) -> list[Any]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _flatten(torch, item)]
    if isinstance(out, Mapping):
        return [leaf for item in out.values() for leaf in _flatten(torch, item)]
    raise ConversionError(f"forward() returned a {type(out).__name__}; only tensors (in tuples, lists, dicts) convert")


def _shapes(args: Sequence[Any]) -> str:
    return ", ".join("x".join(str(d) for d in a.shape) for a in args)


def _output_names(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def _export_module(
    torch: Any, module: Any, args: tuple[Any, ...], names: list[str], kind: str, inputs_from: str
) -> Exported:
    with _eval_mode(module):
        expected = _run(torch, module, args, kind)
        buffer = io.BytesIO()
        try:
            with _quiet():
                torch.onnx.export(
                    module,
                    args,
                    buffer,
                    dynamo=False,
                    do_constant_folding=False,
                    training=torch.onnx.TrainingMode.EVAL,
                    input_names=names,
                    output_names=_output_names(len(expected)),
                )
        except Exception as exc:
            raise ConversionError(f"{kind}: torch.onnx.export failed ({_first_line(exc)})") from None
    model = onnx.load_from_string(buffer.getvalue())
    exported = _finish(model, kind, names, args, expected, inputs_from, _LEGACY)

    def forward(feeds: Mapping[str, Array]) -> list[Array]:
        with _eval_mode(module):
            return _run(torch, module, _tensors(torch, names, feeds), kind)

    exported.forward = forward
    return exported


def export_program(
    program: Any,
    args: tuple[Any, ...] | None,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None,
    seed: int,
    what: str = "ExportedProgram",
) -> Exported:
    """Export an ExportedProgram on ``args``, or random inputs of ``input_shapes``, or its stored examples."""
    torch = _torch(what)
    onnxscript = _onnxscript(what)
    names = [str(n) for n in program.graph_signature.user_inputs]
    if args is not None:
        inputs_from = "the example inputs"
    elif input_shapes is not None:
        args, inputs_from = _random_inputs(torch, names, input_shapes, seed), f"seed {seed} random inputs"
    else:
        stored = program.example_inputs
        if not stored or stored[1] or not all(isinstance(a, torch.Tensor) for a in stored[0]):
            raise InputError(f"{what}: the program stores no usable example inputs; give input shapes ({shape_hint()})")
        args, inputs_from = tuple(stored[0]), "the program's stored example inputs"
    if len(args) != len(names):
        raise InputError(f"{what}: the program takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    expected = _run(torch, program.module(), args, what)
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, optimize=False, output_names=_output_names(len(expected))
            )
            onnxscript.optimizer.fold_constants(onnx_program.model)
            model = onnx_program.model_proto
    except Exception as exc:
        raise ConversionError(f"{what}: torch.onnx.export failed ({_first_line(exc)})") from None
    exported = _finish(model, EXPORTED_PROGRAM, names, args, expected, inputs_from, _DYNAMO)
    exported.seed = seed

    def forward(feeds: Mapping[str, Array]) -> list[Array]:
        return _run(torch, program.module(), _tensors(torch, names, feeds), what)

    exported.forward = forward
    return exported


def _tensors(torch: Any, names: list[str], feeds: Mapping[str, Array]) -> tuple[Any, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)


def _finish(
    model: ModelProto,
    kind: str,
    names: list[str],
    args: tuple[Any, ...],
    expected: list[Array],
    inputs_from: str,
    how: str,
) -> Exported:
    graph_inputs = [i.name for i in model.graph.input]
    if graph_inputs != names:
        raise ConversionError(f"{kind}: the ONNX export has inputs {graph_inputs}, expected {names}")
    if len(model.graph.output) != len(expected):
        raise ConversionError(
            f"{kind}: the ONNX export has {len(model.graph.output)} outputs, PyTorch returned {len(expected)}"
        )
    import torch  # noqa: PLC0415 - optional dependency, there by now

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args, strict=True)}
    note = f"exported from {kind} by torch {torch.__version__} with {how}, opset {opset}"
    return Exported(model, kind, feeds, expected, inputs_from, notes=[note])


# --------------------------------------------------------------------------------------------------------
# the PyTorch comparison


def reference_label(exported: Exported) -> str:
    """``PyTorch eval on seed 0 random inputs``: the Verification's reference (starts with "PyTorch eval")."""
    return f"PyTorch eval on {exported.inputs_from}"


def source(exported: Exported, name: str) -> Source:
    """The exported ONNX model, verified against it in ONNX Runtime and against PyTorch's eval-mode outputs."""
    framework = Framework("PyTorch", reference(exported, "PyTorch eval"), TOLERANCE, "verify_pytorch", _hint)
    return exported_source(exported, name, framework)


def _hint(report: Report) -> str:
    if report.training:
        return "; the PyTorch model runs BatchNorm in training mode (traced in train mode?): trace after .eval()"
    return ""
