"""Which BatchNorms each tool removes: bnfold vs onnxsim vs ONNX Runtime's basic optimisation level.

Models: every case of ``converter.zoo.FOLD_CASES`` (one per rule bnfold has beyond Conv→BN, and the negative twins
that must keep their BatchNorm), plus small PyTorch modules exported the way bnfold exports them
(``converter.frontends.torch.export_module``: ``dynamo=False, do_constant_folding=False``) when torch is installed:
a Linear→BN1d MLP, BN1d on raw features before a Linear, a Keras-ordered Conv→ReLU→BN block, an Inception-style
concat, a CRNN tail (Conv2d to height 1, squeeze, BN1d) and a sequence Linear (3-D MatMul, reshaped, BN1d).

For each model: BatchNormalization nodes before; left after ``converter.convert`` (verification on); left after
``onnxsim.simplify`` (its defaults, BN fusion on); left in the graph ONNX Runtime writes at ``ORT_ENABLE_BASIC``
(``SessionOptions.optimized_model_filepath``); and the largest relative error of bnfold's model against the
original, ``max|after − before| / max|before|`` over every output and ``--inputs`` seeded random inputs, both run
with ORT optimisations off.

    .venv/bin/python -m benchmarks.fold_coverage          # writes benchmarks/results/fold_coverage.json
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import converter
from benchmarks.environment import emit, git_state, host
from converter import zoo

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fold_coverage.json"


def count_bn(m: ModelProto) -> int:
    return sum(1 for n in m.graph.node if n.op_type == "BatchNormalization")


def session(m: ModelProto | str, level: ort.GraphOptimizationLevel, save: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if save:
        options.optimized_model_filepath = save
    data = m if isinstance(m, str) else m.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def feeds(m: ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    init = {t.name for t in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        out[vi.name] = rng.normal(size=shape).astype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
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
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    for node in g.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.DOUBLE
    return wide


def errors(original: ModelProto, converted: ModelProto, inputs: int) -> dict[str, float | None]:
    """Max relative errors (max|Δ|/max|ref|): bnfold vs the original (both float32 in ONNX Runtime), and each of
    them vs the original evaluated in float64 (onnx.reference), the float32 noise floor."""
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a, b = session(original, off), session(converted, off)
    exact = ReferenceEvaluator(as_float64(original))
    rng = np.random.default_rng(0)
    worst: dict[str, float] = {"vs_original": 0.0, "original_vs_f64": 0.0, "bnfold_vs_f64": 0.0}

    def rel(got: Any, ref: Any) -> float:
        ref64 = np.asarray(ref, np.float64)
        return float(np.max(np.abs(np.asarray(got, np.float64) - ref64)) / np.max(np.abs(ref64)))

    for _ in range(inputs):
        x = feeds(original, rng)
        try:
            truth = exact.run(None, {k: v.astype(np.float64) for k, v in x.items()})
        except Exception:  # onnx.reference lacks a case (grouped ConvTranspose): no float64 floor for it
            truth = None
        for i, (before, after) in enumerate(zip(a.run(None, x), b.run(None, x), strict=True)):
            worst["vs_original"] = max(worst["vs_original"], rel(after, before))
            for key, got in (("original_vs_f64", before), ("bnfold_vs_f64", after)):
                worst[key] = math.nan if truth is None else max(worst[key], rel(got, truth[i]))
    return {k: None if math.isnan(v) else v for k, v in worst.items()}


def ort_basic_bn(m: ModelProto) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "basic.onnx")
        session(m, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, save=path)
        return count_bn(onnx.load(path, load_external_data=False))


def onnxsim_bn(m: ModelProto) -> int | str:
    try:
        import onnxsim
    except ImportError:
        return "n/a"
    try:
        simplified, _ = onnxsim.simplify(m, check_n=0)
    except Exception as exc:  # report, don't hide: a tool failure is a result too
        return f"error: {type(exc).__name__}"
    return count_bn(simplified)


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
            module = cls()
            for sub in module.modules():  # trained-looking statistics, so a wrong fold shows
                if isinstance(sub, nn.BatchNorm1d | nn.BatchNorm2d):
                    sub.running_mean.normal_(0, 0.3)
                    sub.running_var.uniform_(0.5, 2.0)
                    sub.weight.data.uniform_(0.5, 1.5)
                    sub.bias.data.normal_(0, 0.1)
            return module.eval()

        return make

    return {
        "torch_mlp": (trained(MLP), torch.randn(4, 16), "Linear(Gemm) → BN1d"),
        "torch_tabular": (trained(Tabular), torch.randn(4, 10), "BN1d on features → Linear"),
        "torch_keras": (trained(Keras), torch.randn(2, 3, 8, 8), "Conv-ReLU-BN → 1x1 Conv / Flatten → Linear"),
        "torch_inception": (trained(Inception), torch.randn(2, 4, 8, 8), "cat of 3 convs → BN"),
        "torch_crnn": (trained(CRNN), torch.randn(2, 3, 4, 16), "Conv2d H=1 → squeeze → BN1d"),
        "torch_seq_linear": (trained(SeqLinear), torch.randn(2, 5, 16), "3-D Linear (MatMul) → reshape → BN1d"),
    }


def models() -> list[tuple[str, str, ModelProto]]:
    out = [(case.name, case.why, case.build()) for case in zoo.FOLD_CASES]
    if torch_models():
        from converter.frontends import torch as torch_frontend

        for name, (make, example, why) in torch_models().items():
            out.append((name, why, torch_frontend.export_module(make(), example).model))
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for name, why, model in models():
        result = converter.convert(model)
        kinds = [str(r.fold) for r in result.report.layers if r.action == "folded"]
        rows.append(
            {
                "model": name,
                "what": why,
                "bn_before": count_bn(model),
                "bnfold": count_bn(result.model),
                "bnfold_rules": kinds,
                "onnxsim": onnxsim_bn(model),
                "ort_basic": ort_basic_bn(model),
                **errors(model, result.model, args.inputs),
                "kept_reasons": [r.reason for r in result.report.layers if r.action != "folded"],
            }
        )
    versions = {"onnx": onnx.__version__, "onnxruntime": ort.__version__}
    try:
        import onnxsim

        versions["onnxsim"] = onnxsim.__version__
    except ImportError:
        pass
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    return {"rows": rows, "inputs": args.inputs, "versions": versions, "machine": host(), "git": git_state("converter")}


def _e(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'model':<24}{'BN':>4}{'bnfold':>8}{'onnxsim':>9}{'ORT basic':>11}{'rel err':>10}{'orig/f64':>10}"
        f"{'bnfold/f64':>11}  rules bnfold used"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        rules = ", ".join(r["bnfold_rules"]) or "-"
        lines.append(
            f"{r['model']:<24}{r['bn_before']:>4}{r['bnfold']:>8}{r['onnxsim']!s:>9}{r['ort_basic']:>11}"
            f"{r['vs_original']:>10.2e}{_e(r['original_vs_f64']):>10}{_e(r['bnfold_vs_f64']):>11}  {rules}"
        )
    total = {
        k: sum(r[k] for r in result["rows"] if isinstance(r[k], int)) for k in ("bn_before", "bnfold", "ort_basic")
    }
    sim = sum(r["onnxsim"] for r in result["rows"] if isinstance(r["onnxsim"], int))
    lines.append("-" * len(head))
    lines.append(f"{'total':<24}{total['bn_before']:>4}{total['bnfold']:>8}{sim:>9}{total['ort_basic']:>11}")
    v = result["versions"]
    lines.append("")
    lines.append(
        "BN: BatchNormalization nodes in the model; bnfold/onnxsim/ORT basic: left after each tool.\n"
        f"rel err: max|Δ|/max|ref| over every output and {result['inputs']} random inputs, bnfold vs original (both "
        "float32, ORT optimisations off);\norig/f64, bnfold/f64: each float32 model vs the original evaluated in "
        "float64 (onnx.reference; n/a: it cannot run grouped ConvTranspose), the float32 noise floor"
    )
    lines.append(", ".join(f"{k} {val}" for k, val in v.items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=5, help="random inputs per model for the error (default 5)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    logging.getLogger("bnfold").setLevel(logging.WARNING)
    result = run(args)
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
