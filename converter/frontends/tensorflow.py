"""TensorFlow/Keras in: ``.keras`` and ``.h5`` Keras files, SavedModel folders, and Keras models in memory.

Needs the ``tensorflow`` extra (``pip install ".[tensorflow]"``, in a clone: tensorflow-cpu and tf2onnx). TensorFlow
takes seconds to import, so this module imports it only when a TensorFlow input actually arrives; recognising
a file (:func:`sniff`) needs neither TensorFlow nor Keras.

Formats (by suffix and content):

- ``.keras`` (Keras 3 ``model.save``): a zip with ``config.json``; loaded with
  ``keras.saving.load_model(safe_mode=True)``. A config with a ``Lambda`` layer (Python bytecode) is refused
  before Keras sees it, as is anything ``safe_mode`` refuses.
- ``.h5``/``.hdf5`` (legacy Keras HDF5 ``model.save``): the ``model_config`` attribute is checked for
  ``Lambda`` layers first (Keras's HDF5 loader would run their marshalled bytecode), then loaded with
  ``keras.saving.load_model(safe_mode=True)``. A weights-only HDF5 file is refused.
- SavedModel folder (``tf.saved_model.save``): its ``serving_default`` signature (or its only one) is the
  model. A SavedModel is a TensorFlow graph, not pickled Python; bnfold still refuses graphs that touch the
  file system or run Python (:data:`REFUSED_OPS`) before it runs one.

Export (node types seen with TensorFlow 2.21, Keras 3.15, tf2onnx 1.17), chosen so that no tool but bnfold
folds BatchNorm, and bnfold does it in float64 and verifies it:

1. ``tf.function(lambda *x: model(*x, training=False))`` traced on the input signature: inference mode,
   moving statistics. Frozen with ``convert_variables_to_constants_v2`` and *without* tf2onnx's grappler pass,
   whose constant folding pushes a Mul into a preceding Conv's filter (``MulConvPushDown``) and merges the
   Conv bias into BatchNorm's shift, in float32.
2. tf2onnx converts the frozen graph with no ONNX optimizer, then only its constant folding runs; then every
   Conv/ConvTranspose without a bias gets a zero one (tf2onnx's transpose optimizer folds a following Mul
   into a *bias-less* Conv's weights and an Add into its bias, in float32); then all of tf2onnx's optimizers
   run, with ``remove_back_to_back``'s Conv+BatchNormalization fusion taken out: they remove the NHWC↔NCHW
   Transpose pairs around each convolution and push BatchNorm's Mul/Add in front of the remaining ones.
3. :func:`converter.frontends.tensorflow_patterns.canonicalise` moves what tf2onnx left behind layout ops
   (Conv1D's Squeeze) next to its producer and turns Dense's MatMul + bias into Gemm, so the standard rules
   fold it.

The model's reference outputs are TensorFlow's own (``training=False``) on seeded random inputs drawn like
:func:`converter.verify.random_inputs`; when TensorFlow's CPU kernels refuse a layout (``channels_first``
Conv2D exists only on GPUs), the same function is run compiled with XLA.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from onnx import ModelProto, numpy_helper

from converter.core import Framework, Source
from converter.errors import ConversionError, InputError, first_line
from converter.frontends import tensorflow_patterns
from converter.frontends.base import Exported, exported_source, reference
from converter.graph import int_attribute
from converter.verify import resolve_declared

log = logging.getLogger("bnfold.converter")

KERAS = "Keras"
KERAS_H5 = "Keras HDF5"
SAVED_MODEL = "SavedModel"
MODEL = "keras.Model"
KINDS = (KERAS, KERAS_H5, SAVED_MODEL, MODEL)
FRAMEWORK = "TensorFlow"

KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
_H5_MAGIC = b"\x89HDF\r\n\x1a\n"
EXTRA = 'pip install ".[tensorflow]" in a bnfold clone'
OPSET = 17
LAMBDA_HINT = (
    "a Lambda layer stores Python bytecode, which bnfold does not load; replace it with a registered custom "
    "layer (keras.saving.register_keras_serializable) or export a SavedModel (model.export('dir'))"
)

#: TensorFlow ops a SavedModel may not contain: file system, Python, and process access.
REFUSED_OPS = frozenset(
    {
        "ReadFile",
        "WriteFile",
        "MatchingFiles",
        "DeleteFile",
        "PyFunc",
        "PyFuncStateless",
        "EagerPyFunc",
        "SaveV2",
        "Save",
        "SaveSlices",
        "RestoreV2",
        "Restore",
        "RestoreSlice",
        "MergeV2Checkpoints",
        "ShardedFilename",
        "ImmutableConst",
        "LoadAndRemapMatrix",
        "FixedLengthRecordDataset",
        "TFRecordDataset",
        "TextLineDataset",
        "ExperimentalSaveDataset",
        "SaveDataset",
        "LoadDataset",
    }
)

#: Tolerance (atol, rtol) of the TensorFlow comparison, norm-wise as in ORT verification. Measured with
#: TensorFlow 2.21 CPU and ONNX Runtime 1.32 on the layer cases of benchmarks/tf_coverage.py: max rel error
#: of the converted model vs TensorFlow ≤ 3e-7; the bound used is ≤ 1e-5, with room for other CPUs' kernels.
TOLERANCE: tuple[float, float] = (1e-6, 1e-5)

Array = NDArray[Any]


# --------------------------------------------------------------------------------------------------------
# recognising files (no TensorFlow needed)


def sniff(path: str | Path) -> str | None:
    """:data:`KERAS`, :data:`KERAS_H5` or :data:`SAVED_MODEL` for a TensorFlow input, None for anything else.

    Raises :class:`InputError` for a TensorFlow file bnfold refuses (a Lambda layer, a weights-only file, a
    corrupt archive).
    """
    p = Path(path)
    if p.is_dir():
        if (p / "saved_model.pb").is_file() or (p / "saved_model.pbtxt").is_file():
            return SAVED_MODEL
        raise InputError(f"{p}: a directory without saved_model.pb (not a SavedModel); give a model file")
    suffix = p.suffix.lower()
    try:
        with p.open("rb") as f:
            head = f.read(8)
    except OSError:
        return None  # modelio.load says what is wrong
    if suffix in KERAS_SUFFIXES:
        _screen_keras(p)
        return KERAS
    if suffix in H5_SUFFIXES or head == _H5_MAGIC:
        if head != _H5_MAGIC:
            raise InputError(f"{p}: not an HDF5 file")
        return KERAS_H5
    return None


def _screen_keras(p: Path) -> None:
    try:
        with zipfile.ZipFile(p) as archive:
            if "config.json" not in archive.namelist():
                raise InputError(f"{p}: a zip archive without config.json, not a Keras 3 .keras file")
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, KeyError) as exc:
        raise InputError(f"{p}: corrupt or truncated .keras file ({first_line(exc)})") from None
    if _has_lambda(config):
        raise InputError(f"{p}: {LAMBDA_HINT}")


def _screen_h5(p: Path) -> None:
    h5py = _import("h5py", f"{p}")
    try:
        with h5py.File(p, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as exc:
        raise InputError(f"{p}: cannot read the HDF5 file ({first_line(exc)})") from None
    if raw is None:
        raise InputError(f"{p}: an HDF5 file without a model config (weights only?); save the whole model")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    try:
        config = json.loads(text)
    except ValueError:
        raise InputError(f"{p}: the HDF5 model config is not JSON") from None
    if _has_lambda(config):
        raise InputError(f"{p}: {LAMBDA_HINT}")


def _has_lambda(config: Any) -> bool:
    if isinstance(config, dict):
        if config.get("class_name") in ("Lambda", "TFOpLambda") and config.get("module", "keras.layers") != "":
            return True
        return any(_has_lambda(v) for v in config.values())
    if isinstance(config, list):
        return any(_has_lambda(v) for v in config)
    return False


# --------------------------------------------------------------------------------------------------------
# TensorFlow from here on


def _import(name: str, what: str) -> Any:
    try:
        import importlib  # noqa: PLC0415

        return importlib.import_module(name)
    except ImportError:
        raise InputError(f"{what} needs TensorFlow and tf2onnx, which are not installed: {EXTRA}") from None


def _tf(what: str) -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
    tf = _import("tensorflow", what)
    _import("tf2onnx", what)
    for name in ("tensorflow", "tf2onnx", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return tf


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """tf2onnx and Keras print progress to stdout/stderr; a CLI run keeps them for its report."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def export_file(
    path: str | Path,
    kind: str,
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None,
    seed: int,
    custom_objects: Mapping[str, Any] | None = None,
) -> Exported:
    """Load a TensorFlow file or folder and export it; ``input_shapes`` fixes dynamic dims (default 1).
    ``custom_objects``: Keras's ``{name: class}`` for custom layers not registered in this process."""
    p = Path(path)
    tf = _tf(f"{p} ({kind})")
    if kind == SAVED_MODEL:
        fn, specs, names = _load_saved_model(tf, p)
        return _export(tf, fn, specs, names, input_shapes, seed, SAVED_MODEL, str(p))
    if kind == KERAS_H5:
        _screen_h5(p)
    keras = _import("keras", str(p))
    try:
        with _quiet():
            model = keras.saving.load_model(p, compile=False, safe_mode=True, custom_objects=custom_objects)
    except Exception as exc:
        missing = _unregistered(keras, p, custom_objects) if kind == KERAS else []
        if missing:
            modules = " ".join(f"--import {m}" for m in dict.fromkeys(m for m, _ in missing))
            raise InputError(
                f"{p}: Keras cannot deserialize the custom object(s) {', '.join(n for _, n in missing)}: import "
                f"the module that registers them ({modules}; custom_objects= in Python) or convert a SavedModel "
                "written by model.export('dir')"
            ) from None
        raise InputError(f"{p}: Keras cannot load it safely ({first_line(exc)})") from None
    fn, specs, names = _keras_function(tf, model)
    return _export(tf, fn, specs, names, input_shapes, seed, kind, str(p))


def _unregistered(keras: Any, p: Path, custom_objects: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """(module, registered name) of each object in a ``.keras`` config from outside Keras that neither the
    registry nor ``custom_objects`` knows."""
    with zipfile.ZipFile(p) as archive:
        config = json.loads(archive.read("config.json"))
    found: list[tuple[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            module, name = node.get("module"), node.get("registered_name") or node.get("class_name")
            if isinstance(module, str) and isinstance(name, str) and module.split(".")[0] != "keras":
                known = keras.saving.get_registered_object(name, custom_objects)
                if known is None and (module, name) not in found:
                    found.append((module, name))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return found


def export_model(model: Any, input_signature: Any = None, *, input_shapes: Any = None, seed: int = 0) -> Exported:
    """Export a Keras model in memory. ``input_signature``: tf.TensorSpec(s) (default: the model's inputs)."""
    tf = _tf(MODEL)
    fn, specs, names = _keras_function(tf, model, input_signature)
    return _export(tf, fn, specs, names, input_shapes, seed, MODEL, type(model).__name__)


def _keras_function(tf: Any, model: Any, signature: Any = None) -> tuple[Any, list[Any], list[str]]:
    if signature is None:
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise InputError(f"{type(model).__name__}: the model has no known inputs; give an input_signature")
        specs = [tf.TensorSpec(tuple(t.shape), t.dtype) for t in inputs]
        raw = [str(getattr(t, "name", "")) for t in inputs]
    else:
        specs = list(signature) if isinstance(signature, (list, tuple)) else [signature]
        raw = [str(getattr(s, "name", None) or "") for s in specs]
    names = _input_names(raw)
    specs = [tf.TensorSpec(s.shape, s.dtype, name=n) for s, n in zip(specs, names, strict=True)]

    def call(*args: Any) -> Any:
        return model(args[0] if len(args) == 1 else list(args), training=False)

    return tf.function(call, input_signature=specs, autograph=False).get_concrete_function(), specs, names


def _input_names(raw: Sequence[str]) -> list[str]:
    names: list[str] = []
    for i, name in enumerate(raw):
        clean = "".join(c if c.isalnum() or c == "_" else "_" for c in name.split(":")[0])
        if not clean or clean.startswith("keras_tensor") or clean in names:
            clean = "input" if len(raw) == 1 else f"input{i}"
        names.append(clean)
    return names


def _load_saved_model(tf: Any, p: Path) -> tuple[Any, list[Any], list[str]]:
    try:
        with _quiet():
            loaded = tf.saved_model.load(str(p))
    except Exception as exc:
        raise InputError(f"{p}: TensorFlow cannot load the SavedModel ({first_line(exc)})") from None
    signatures = dict(loaded.signatures)
    if not signatures:
        raise InputError(f"{p}: the SavedModel has no signature; save it with signatures= or model.export()")
    key = "serving_default" if "serving_default" in signatures else None
    if key is None and len(signatures) == 1:
        key = next(iter(signatures))
    if key is None:
        raise InputError(f"{p}: several signatures and no serving_default: {', '.join(sorted(signatures))}")
    fn = signatures[key]
    _screen_ops(p, fn.graph.as_graph_def())
    args, kwargs = fn.structured_input_signature
    if args:
        raise InputError(f"{p}: signature {key!r} takes positional inputs; bnfold needs named ones")
    names = sorted(kwargs)
    specs = [tf.TensorSpec(kwargs[n].shape, kwargs[n].dtype, name=n) for n in names]
    # keep a reference to `loaded`: the signature's variables live as long as it does
    fn._bnfold_owner = loaded
    return fn, specs, names


def _screen_ops(p: Path, graph_def: Any) -> None:
    ops = {n.op for n in graph_def.node}
    for function in graph_def.library.function:
        ops.update(n.op for n in function.node_def)
    bad = sorted(ops & REFUSED_OPS)
    if bad:
        raise InputError(f"{p}: the SavedModel's graph runs {', '.join(bad)} (file system or Python); refused")


def _shapes_for(
    specs: Sequence[Any], names: list[str], input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None
) -> dict[str, list[int]]:
    declared = [
        (name, spec.shape.as_list() if spec.shape.rank is not None else None)
        for spec, name in zip(specs, names, strict=True)
    ]
    return resolve_declared(declared, input_shapes)


def _run(tf: Any, fn: Any, feeds: list[Array], names: list[str], what: str) -> tuple[list[Array], str]:
    """TensorFlow's outputs, flattened; XLA when the CPU kernels refuse the layout. Returns (outputs, how)."""
    tensors = [tf.constant(a) for a in feeds]

    def call(f: Any) -> Any:
        if getattr(f, "structured_input_signature", None) and f.structured_input_signature[1]:
            return f(**dict(zip(names, tensors, strict=True)))
        return f(*tensors)

    how = "TensorFlow"
    try:
        with _quiet():
            out = call(fn)
    except tf.errors.UnimplementedError:
        try:
            with _quiet():
                out = call(tf.function(fn.__call__, jit_compile=True))
            how = "TensorFlow (XLA: the CPU kernels do not implement this layout)"
        except Exception as exc:
            raise InputError(f"{what}: TensorFlow cannot run it on CPU ({first_line(exc)})") from None
    except Exception as exc:
        raise InputError(f"{what}: TensorFlow cannot run it on the given inputs ({first_line(exc)})") from None
    leaves = tf.nest.flatten(out)
    if not leaves:
        raise ConversionError(f"{what}: the model returned no tensor")
    return [np.asarray(t.numpy()) for t in leaves], how


def _export(
    tf: Any,
    fn: Any,
    specs: list[Any],
    names: list[str],
    input_shapes: Mapping[str, Sequence[int]] | Sequence[int] | None,
    seed: int,
    kind: str,
    what: str,
) -> Exported:
    import tf2onnx  # noqa: PLC0415 - optional dependency, imported by _tf already
    from tf2onnx import optimizer as tf2onnx_optimizer  # noqa: PLC0415
    from tf2onnx import tf_loader  # noqa: PLC0415
    from tf2onnx.convert import _convert_common, tensor_names_from_structed  # noqa: PLC0415
    from tf2onnx.graph import GraphUtil  # noqa: PLC0415

    shapes = _shapes_for(specs, names, input_shapes)
    rng = np.random.default_rng(seed)
    feeds = [
        rng.standard_normal(tuple(shapes[n])).astype(s.dtype.as_numpy_dtype) for s, n in zip(specs, names, strict=True)
    ]
    concrete = fn
    expected, how = _run(tf, concrete, feeds, names, what)
    input_names = [t.name for t in concrete.inputs if t.dtype != tf.resource]
    output_names = [t.name for t in concrete.outputs if t.dtype != tf.resource]
    try:
        with _quiet(), tf.device("/cpu:0"):
            frozen = tf_loader.convert_variables_to_constants_v2(
                concrete, lower_control_flow=False, aggressive_inlining=True
            )
            graph_def = tf_loader.fix_freezing_errors_part2(frozen.graph.as_graph_def(add_shapes=True))
            rename = tensor_names_from_structed(concrete, input_names, output_names)
            model, _ = _convert_common(
                graph_def,
                name=kind,
                opset=OPSET,
                input_names=input_names,
                output_names=output_names,
                tensors_to_rename=rename,
                optimizers={},
            )
            available = tf2onnx_optimizer._get_optimizers()
            model = GraphUtil.optimize_model_proto(
                model, optimizers=OrderedDict((k, available[k]) for k in ("fold_constants", "remove_identity"))
            )
            biased = add_zero_biases(model)
            with _without_conv_bn_fusion():
                model = GraphUtil.optimize_model_proto(model, optimizers=available)
    except InputError:
        raise
    except Exception as exc:
        raise ConversionError(f"{what}: tf2onnx could not export it ({first_line(exc)})") from None
    _rename_outputs(model, _output_names(concrete, len(output_names)))
    onnx_inputs = [i.name for i in model.graph.input]
    if sorted(onnx_inputs) != sorted(names):
        raise ConversionError(f"{what}: the ONNX export has inputs {onnx_inputs}, expected {names}")
    if len(model.graph.output) != len(expected):
        raise ConversionError(
            f"{what}: the ONNX export has {len(model.graph.output)} outputs, TensorFlow returned {len(expected)}"
        )
    import keras  # noqa: PLC0415 - comes with tensorflow

    note = (
        f"exported from {kind} by TensorFlow {tf.__version__} (Keras {keras.__version__}) with tf2onnx "
        f"{tf2onnx.__version__}, inference mode (training=False), opset {OPSET}; no Conv+BN fusion by grappler "
        f"or tf2onnx ({biased} bias-less convolution(s) given a zero bias for that)"
    )
    exported = Exported(
        model,
        kind,
        dict(zip(names, feeds, strict=True)),
        expected,
        f"seed {seed} random inputs",
        seed=seed,
        notes=[note],
    )
    if how != "TensorFlow":
        exported.notes.append(f"TensorFlow reference outputs computed by {how}")

    def forward(given: Mapping[str, Array]) -> list[Array]:
        return _run(tf, concrete, [np.asarray(given[n]) for n in names], names, what)[0]

    exported.forward = forward
    return exported


def source(exported: Exported, name: str) -> Source:
    """The tf2onnx export as the ORT reference; then TensorFlow's forms canonicalised for the rules (exact
    rewrites, so verifying against the unrewritten export covers them too)."""
    framework = Framework(
        "TensorFlow", reference(exported, "TensorFlow inference (training=False)"), TOLERANCE, "verify_tensorflow"
    )
    converted = exported_source(exported, name, framework)
    counts = tensorflow_patterns.canonicalise(converted.model)
    if any(counts.values()):
        converted.notes.append(
            f"TensorFlow forms rewritten for folding: {counts['moved']} Mul/Add moved before a layout op, "
            f"{counts['gemm']} MatMul(+bias) made Gemm"
        )
    return converted


@contextlib.contextmanager
def _without_conv_bn_fusion() -> Iterator[None]:
    """tf2onnx's ``remove_back_to_back`` optimizer without its Conv+BatchNormalization fusion (float32).

    The optimizer keeps its handlers in a module-level map; the Conv+BN entry is taken out for the export and
    put back afterwards. Its other handlers (Transpose+Transpose, Cast+Cast, Squeeze+Unsqueeze, Reshape+Reshape)
    are what cancels the layout Transposes around a BatchNormalization node.
    """
    from tf2onnx.optimizer import back_to_back_optimizer  # noqa: PLC0415

    handlers = back_to_back_optimizer._func_map
    key = ("Conv", "BatchNormalization")
    fusion = handlers.pop(key, None)
    try:
        yield
    finally:
        if fusion is not None:
            handlers[key] = fusion


def _output_names(concrete: Any, count: int) -> list[str]:
    """A signature's output keys (sorted, as TensorFlow flattens a dict), else ``output`` / ``output0``…"""
    structured = concrete.structured_outputs
    if isinstance(structured, Mapping) and len(structured) == count:
        return sorted(str(k) for k in structured)
    return ["output"] if count == 1 else [f"output{i}" for i in range(count)]


def _rename_outputs(model: ModelProto, names: list[str]) -> None:
    """Give the graph outputs ``names`` (in order), renaming the values everywhere they appear."""
    graph = model.graph
    if len(names) != len(graph.output) or len(set(names)) != len(names):
        return
    mapping = {o.name: n for o, n in zip(graph.output, names, strict=True) if o.name != n}
    taken = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    taken |= {o for node in graph.node for o in node.output} - set(mapping)
    if not mapping or taken & set(mapping.values()) or len(set(mapping)) != len(mapping):
        return
    for node in graph.node:
        node.output[:] = [mapping.get(o, o) for o in node.output]
        node.input[:] = [mapping.get(i, i) for i in node.input]
    for out in graph.output:
        out.name = mapping.get(out.name, out.name)
    for vi in graph.value_info:
        vi.name = mapping.get(vi.name, vi.name)


def add_zero_biases(model: ModelProto) -> int:
    """Give each Conv/ConvTranspose without a bias and with a constant weight an explicit zero bias."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    added = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or (len(node.input) > 2 and node.input[2]):
            continue
        weight = inits.get(node.input[1])
        if weight is None or len(weight.dims) < 3:
            continue
        group = int_attribute(node, "group", 1)
        channels = weight.dims[0] if node.op_type == "Conv" else weight.dims[1] * group
        dtype = numpy_helper.to_array(weight).dtype
        base = f"{node.name or node.output[0]}_zero_bias"
        name, k = base, 0
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.add(name)
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(int(channels), dtype), name))
        del node.input[2:]
        node.input.append(name)
        added += 1
    return added


def affine_pairs(model: ModelProto) -> dict[str, int]:
    """BatchNorm-like nodes left in a model: BatchNormalization nodes, and Mul→Add pairs with constant operands
    (the decomposed ``tf.nn.batch_normalization``), counted in the main graph."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    readers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    pairs = 0
    for n in model.graph.node:
        if n.op_type != "Mul" or len(n.input) != 2 or not any(i in consts for i in n.input):
            continue
        after = readers.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add" and any(i in consts for i in after[0].input):
            pairs += 1
    bns = sum(1 for n in model.graph.node if n.op_type == "BatchNormalization")
    return {"batchnorm": bns, "mul_add": pairs}
