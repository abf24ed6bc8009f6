"""Prove a conversion in ONNX Runtime: original vs converted on the same inputs (seeded random ones, and real
samples when given), or the converted model vs the source framework's own outputs (PyTorch, …).

Both models run with graph optimisations disabled (ORT_DISABLE_ALL), so the runtime's own Conv+BN fusion
cannot hide what the converter did. The sessions run one after the other, so only one model is resident.

An output passes when ``max|converted − original| ≤ atol + rtol·max|original|``: a norm-wise bound, scaled
by the output's own magnitude, so that elements near zero do not turn float32 rounding into a false alarm.
The reported relative error is that same ratio, ``max|Δ| / max|original|``. NaN or infinity in either
model's output is counted and fails the output: it is never compared as a pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import ModelProto

from converter.errors import InputError, first_line, shape_hint

#: Default tolerances (atol, rtol). float32: rtol 1e-4 is ~840 ulps of the output's magnitude; re-rounded folded
#: weights accumulate ~1e-5 through a ResNet-50-sized net (53 folds), while a wrong fold (wrong axis, wrong group,
#: wrong ε) shows up at 1e-2 and above. float16: what float16 weights and activations allow.
TOLERANCES: dict[str, tuple[float, float]] = {"float32": (1e-6, 1e-4), "float16": (1e-3, 2e-2)}

ModelSource = str | Path | bytes | ModelProto
InputShapes = Mapping[str, Sequence[int]] | Sequence[int] | None
Array = NDArray[Any]
Feeds = dict[str, Array]
#: A framework's forward pass: ONNX input name -> array in, outputs in the ONNX output order out.
OutputsFn = Callable[[Mapping[str, Array]], Sequence[Array]]

_ORT_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


@dataclass
class OutputCheck:
    """One output compared over one set of inputs (the worst run for the errors).

    ``nonfinite_original``/``nonfinite_converted`` count NaN and infinite values; any is a failure: a value
    that is not a number proves nothing about the fold. ``top1``/``topk`` (over real samples, for 2-D float
    outputs that look like class scores): the fraction of samples whose largest score is the same class, and
    the mean overlap of the ``k`` largest.
    """

    name: str
    max_abs: float
    max_rel: float
    passed: bool
    detail: str = ""
    nonfinite_original: int = 0
    nonfinite_converted: int = 0
    top1: float | None = None
    topk: float | None = None
    k: int | None = None
    failed_run: int | None = None  # the first run (sample) that failed


@dataclass
class Verification:
    passed: bool
    atol: float
    rtol: float
    seed: int
    inputs: dict[str, list[int]]  # the shape of each input in one run
    outputs: list[OutputCheck] = field(default_factory=list)
    reference: str = "the original model"
    inputs_from: str = "seed 0 random inputs"
    runs: int = 1  # how many times both models ran (one per sample)
    framework: bool = False  # the reference is the source framework's forward pass, not an ONNX model
    samples: bool = False  # the inputs were real samples (not random ones)


@dataclass
class InputSet:
    """Inputs a verification runs on: one feed per run (a sample is one run, batch of one)."""

    source: str  # "seed 0 random inputs", "100 samples from digits.npz"
    feeds: list[Feeds]
    samples: bool = False  # real samples: class-score agreement is measured over them


@dataclass(frozen=True)
class Reference:
    """What a converted model is compared with: an ONNX model run in ONNX Runtime (:meth:`onnx`), or the
    source framework's own forward pass (:meth:`framework`: PyTorch, TensorFlow…), called once per feed with
    ONNX input names as keys and returning the outputs in the ONNX output order."""

    label: str
    model: ModelSource | None = None
    forward: OutputsFn | None = None
    fixed: InputSet | None = None  # inputs a framework reference is always checked on (its example inputs)

    @classmethod
    def onnx(cls, model: ModelSource, label: str = "the original model") -> Reference:
        return cls(label, model=model)

    @classmethod
    def framework(cls, label: str, forward: OutputsFn, fixed: InputSet) -> Reference:
        return cls(label, forward=forward, fixed=fixed)


@dataclass
class Checked:
    """What :func:`verify` found: one Verification per input set, and the sets (for a trace)."""

    results: list[Verification]
    sets: list[InputSet]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.results)

    def failing_feeds(self) -> tuple[Feeds, str] | None:
        """The inputs of the first failing run, and where they came from."""
        for v, s in zip(self.results, self.sets, strict=True):
            for o in v.outputs:
                if not o.passed and s.feeds:
                    i = o.failed_run or 0
                    return s.feeds[i], (f"sample {i} of {s.source}" if s.samples else s.source)
        return None


def numpy_dtype(ort_type: str) -> type[np.generic] | None:
    """The numpy type of an ONNX Runtime type string (``tensor(float)`` -> float32); None when unknown."""
    return _ORT_TYPES.get(ort_type)


def session(model: ModelSource, providers: Sequence[str] = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """An ORT session with every graph optimisation off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source: str | bytes
    if isinstance(model, ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, Path):
        source = str(model)
    else:
        source = model
    return ort.InferenceSession(source, options, providers=list(providers))


def resolve_shapes(inputs: Sequence[ort.NodeArg], requested: InputShapes) -> dict[str, list[int]]:
    """Concrete shapes for an ONNX Runtime session's inputs (see :func:`resolve_declared`)."""
    return resolve_declared([(i.name, list(i.shape) if i.shape is not None else None) for i in inputs], requested)


def resolve_declared(
    declared: Sequence[tuple[str, Sequence[object] | None]], requested: InputShapes
) -> dict[str, list[int]]:
    """Concrete shapes for inputs declared as ``(name, dims or None)``, a dim static when it is an int >= 0:
    static dims as declared, dynamic ones from ``requested`` (one shape, or shapes by name), else 1."""
    names = [name for name, _ in declared]
    by_name: Mapping[str, Sequence[int]]
    if requested is None:
        by_name = {}
    elif isinstance(requested, Mapping):
        unknown = set(requested) - set(names)
        if unknown:
            raise InputError(f"input shapes given for no input of the model: {', '.join(sorted(unknown))}")
        by_name = requested
    else:
        if len(names) != 1:
            each = shape_hint("NAME")
            raise InputError(f"the model has {len(names)} inputs ({', '.join(names)}); give each a shape ({each})")
        by_name = {names[0]: requested}
    shapes = {}
    for name, dims in declared:
        static = [d if isinstance(d, int) and d >= 0 else None for d in dims] if dims is not None else None
        given = by_name.get(name)
        if given is None:
            if static is None:
                raise InputError(f"input {name!r} has no declared shape; give one ({shape_hint(name)})")
            shapes[name] = [1 if d is None else d for d in static]
            continue
        given = [int(d) for d in given]
        if static is not None:
            if len(given) != len(static):
                raise InputError(f"input {name!r} has rank {len(static)}; the shape given has {len(given)} dims")
            for axis, (g, d) in enumerate(zip(given, static, strict=True)):
                if d is not None and g != d:
                    raise InputError(f"input {name!r} has static dim {d} on axis {axis}; the shape given says {g}")
        if any(d < 0 for d in given):
            raise InputError(f"the shape given for input {name!r} has a negative dim")
        shapes[name] = given
    return shapes


def random_inputs(
    inputs: Sequence[ort.NodeArg], shapes: Mapping[str, Sequence[int]], seed: int
) -> dict[str, NDArray[np.generic]]:
    """Seeded values for each input: standard normal floats, small non-negative integers, random booleans."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, NDArray[np.generic]] = {}
    for arg in inputs:
        dtype = _ORT_TYPES.get(arg.type)
        if dtype is None:
            raise InputError(f"input {arg.name!r} has type {arg.type}, which verification cannot generate")
        shape = tuple(shapes[arg.name])
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[arg.name] = np.asarray(rng.random(shape) < 0.5)
        elif dtype is np.str_:
            feeds[arg.name] = np.full(shape, "bnfold", dtype=object)
        else:
            feeds[arg.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def compare(name: str, got: Array, want: Array, atol: float, rtol: float) -> OutputCheck:
    """One output of one run: the norm-wise test of the module docstring; NaN or infinity anywhere fails."""
    if got.shape != want.shape:
        return OutputCheck(name, math.inf, math.inf, False, f"shape {got.shape} != {want.shape}")
    if not (np.issubdtype(want.dtype, np.floating) or np.issubdtype(got.dtype, np.floating)):
        equal = bool(np.array_equal(got, want))
        return OutputCheck(name, 0.0 if equal else math.inf, 0.0 if equal else math.inf, equal, "exact comparison")
    g64, w64 = np.asarray(got, np.float64), np.asarray(want, np.float64)
    finite_g, finite_w = np.isfinite(g64), np.isfinite(w64)
    bad_g, bad_w = int(g64.size - np.count_nonzero(finite_g)), int(w64.size - np.count_nonzero(finite_w))
    both = finite_g & finite_w
    max_abs = scale = 0.0
    if np.any(both):
        max_abs = float(np.abs(g64[both] - w64[both]).max())
        scale = float(np.abs(w64[both]).max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    check = OutputCheck(name, max_abs, max_rel, max_abs <= atol + rtol * scale and not (bad_g or bad_w))
    if bad_g or bad_w:
        check.detail = f"NaN/Inf: {bad_w} in the original, {bad_g} in the converted model"
        check.nonfinite_original, check.nonfinite_converted = bad_w, bad_g
    return check


def combine(name: str, checks: Sequence[OutputCheck]) -> OutputCheck:
    """One output over several runs: the worst errors, failed when any run failed, non-finite values summed."""
    out = OutputCheck(name, 0.0, 0.0, True)
    for i, c in enumerate(checks):
        if not c.passed and out.failed_run is None:
            out.failed_run = i
        out.max_abs, out.max_rel = max(out.max_abs, c.max_abs), max(out.max_rel, c.max_rel)
        out.passed = out.passed and c.passed
        out.nonfinite_original += c.nonfinite_original
        out.nonfinite_converted += c.nonfinite_converted
        out.detail = out.detail or c.detail
    if out.nonfinite_original or out.nonfinite_converted:
        bad_w, bad_g = out.nonfinite_original, out.nonfinite_converted
        out.detail = f"NaN/Inf: {bad_w} in the original, {bad_g} in the converted model"
    return out


def class_agreement(got: Sequence[Array], want: Sequence[Array]) -> tuple[float, float, int] | None:
    """(top-1 agreement, mean top-k overlap, k) over the rows of 2-D float outputs with at least 2 columns,
    one array per run; None for outputs that do not look like class scores. k = min(5, classes − 1)."""
    if not want or not all(w.ndim == 2 and np.issubdtype(w.dtype, np.floating) for w in (*got, *want)):
        return None
    g = np.concatenate([np.asarray(a, np.float64) for a in got])
    w = np.concatenate([np.asarray(a, np.float64) for a in want])
    if g.shape != w.shape or g.shape[1] < 2 or g.shape[0] == 0:
        return None
    k = min(5, g.shape[1] - 1)
    top1 = float(np.mean(np.argmax(g, axis=1) == np.argmax(w, axis=1)))
    gk, wk = np.argsort(-g, axis=1, kind="stable")[:, :k], np.argsort(-w, axis=1, kind="stable")[:, :k]
    overlap = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(gk, wk, strict=True)]
    return top1, float(np.mean(overlap)), k


def cast_feeds(sess: ort.InferenceSession, feeds: Mapping[str, Array], what: str) -> Feeds:
    """``feeds`` in the dtypes ``sess`` declares (float32 samples for a float16-input model, say)."""
    cast: Feeds = {}
    for arg in sess.get_inputs():
        if arg.name not in feeds:
            raise InputError(f"the converted model has an input {what} lacks: {arg.name}")
        cast[arg.name] = np.asarray(feeds[arg.name]).astype(_ORT_TYPES.get(arg.type, np.float32), copy=False)
    return cast


def _run(sess: ort.InferenceSession, names: list[str], feeds: Feeds, what: str) -> list[Array]:
    try:
        return [np.asarray(o) for o in sess.run(names, feeds)]
    except Exception as exc:  # ORT raises several unrelated types for inputs it refuses
        first = first_line(exc)
        raise InputError(f"{what}: the original model cannot run it ({first})") from None


def verify(
    reference: Reference,
    converted: ModelSource,
    *,
    atol: float,
    rtol: float,
    input_shapes: InputShapes = None,
    seed: int = 0,
    samples: InputSet | None = None,
    random: bool = True,
) -> Checked:
    """Run the reference and the converted model on the same inputs and compare every output; one
    :class:`Verification` per input set: the seeded random inputs (unless ``random`` is False) or a framework
    reference's fixed inputs, then ``samples``.

    An ONNX reference that ONNX Runtime cannot run is the input's fault (InputError); a converted model that it
    cannot run is a failed conversion (raised as is, reported by the caller as a verification failure).
    """
    sets: list[InputSet] = []
    if reference.model is not None:
        try:
            sess = session(reference.model)
        except Exception as exc:  # ORT raises several unrelated types for models it refuses
            first = first_line(exc)
            raise InputError(f"the original model does not run in ONNX Runtime: {first}") from None
        if random:
            shapes = resolve_shapes(sess.get_inputs(), input_shapes)
            sets.append(InputSet(f"seed {seed} random inputs", [random_inputs(sess.get_inputs(), shapes, seed)]))
        sets.extend([samples] if samples is not None else [])
        names = [o.name for o in sess.get_outputs()]
        expected = [[_run(sess, names, f, _which(s, i)) for i, f in enumerate(s.feeds)] for s in sets]
        del sess
    else:
        assert reference.forward is not None and reference.fixed is not None
        sets = [reference.fixed, *([samples] if samples is not None else [])]
        expected = [[[np.asarray(o) for o in reference.forward(f)] for f in s.feeds] for s in sets]
        names = []
    sess = session(converted)
    names = names or [o.name for o in sess.get_outputs()]
    got = [[_run_converted(sess, names, f) for f in s.feeds] for s in sets]
    del sess
    results = []
    for s, g_runs, w_runs in zip(sets, got, expected, strict=True):
        label = reference.label if reference.model is not None else f"{reference.label} on {s.source}"
        shapes = {k: list(v.shape) for k, v in s.feeds[0].items()} if s.feeds else {}
        v = Verification(True, atol, rtol, seed, shapes, reference=label, inputs_from=s.source, runs=len(s.feeds))
        v.framework, v.samples = reference.model is None, s.samples
        if any(len(w) != len(names) for w in w_runs):
            v.passed = False
            detail = f"{len(names)} outputs, the reference returned {len(w_runs[0])}"
            v.outputs.append(OutputCheck("*", math.inf, math.inf, False, detail))
            results.append(v)
            continue
        for j, name in enumerate(names):
            gs, ws = [r[j] for r in g_runs], [r[j] for r in w_runs]
            check = combine(name, [compare(name, a, b, atol, rtol) for a, b in zip(gs, ws, strict=True)])
            agreement = class_agreement(gs, ws) if s.samples else None
            if agreement is not None:
                check.top1, check.topk, check.k = agreement
            v.outputs.append(check)
            v.passed = v.passed and check.passed
        results.append(v)
    return Checked(results, sets)


def _which(s: InputSet, i: int) -> str:
    return f"sample {i} of {s.source}" if s.samples else s.source


def _run_converted(sess: ort.InferenceSession, names: list[str], feeds: Feeds) -> list[Array]:
    return [np.asarray(o) for o in sess.run(names, cast_feeds(sess, feeds, "the reference"))]
