"""Batch-1 inference latency in ONNX Runtime (CPU): original vs bnfold-folded vs onnxsim-simplified.

Two networks built in code (``converter.zoo``): ResNet-18 and MobileNetV2, input 1×3×224×224 float32.
Each variant runs with graph optimisations off (ORT_DISABLE_ALL: what the converter itself did) and all on
(ORT_ENABLE_ALL: what a deployment sees; ORT then fuses Conv+BN on its own). All sessions are created up
front, warmed up, and measured round-robin: within a round the variants of one (network, level) take turns
run by run (the order rotates every round), so drift on a noisy machine hits every variant alike. Ratios are
paired within a round (variant / original of the same round), and the verdict on a target is a one-sided
sign test over those per-round ratios.

    .venv/bin/python -m benchmarks.inference            # full run, writes benchmarks/results/inference.json
    .venv/bin/python -m benchmarks.inference --quick    # sanity run (seconds)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
from onnx import ModelProto

import converter
from benchmarks.environment import emit, git_state, host
from converter import zoo

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "inference.json"
VARIANTS = ("original", "bnfold", "onnxsim")
OPT_LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: onnxsim.simplify keyword arguments, recorded in the JSON. These are its defaults, spelled out: BN fusion
#: (the ``fuse_bn_into_conv`` pass) runs unless ``skip_fuse_bn``; ``check_n=0`` means its only check is
#: ``onnx.checker``; this script compares outputs itself (``max_abs_diff``).
ONNXSIM_OPTIONS: dict[str, Any] = {
    "check_n": 0,
    "perform_optimization": True,
    "skip_fuse_bn": False,
    "skipped_optimizers": None,
    "skip_constant_folding": False,
}
NETWORKS: dict[str, Callable[[], ModelProto]] = {
    "resnet18": zoo.resnet,  # ResNet-18
    "mobilenet_v2": zoo.mobilenet_v2,
}
ALPHA = 0.05  # sign-test level for "slower beyond noise"


@dataclass
class Cell:
    """One (network, optimisation level, variant): its session and the latencies measured, per round."""

    network: str
    level: str
    variant: str
    session: ort.InferenceSession
    rounds: list[list[float]] = field(default_factory=list)  # ms

    def all_ms(self) -> list[float]:
        return [t for r in self.rounds for t in r]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def sign_test_p(slower: int, n: int) -> float:
    """One-sided binomial p-value: chance of ≥ ``slower`` of ``n`` rounds slower if both were equally fast."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(slower, n + 1)) / 2**n


def not_slower(ratios: Sequence[float]) -> tuple[bool, str]:
    """Target "A is not slower than B" from per-round ratios A/B: met unless A is slower beyond noise."""
    med = statistics.median(ratios)
    slower = sum(r > 1.0 for r in ratios)
    p = sign_test_p(slower, len(ratios))
    if med <= 1.0:
        return True, "yes"
    if p >= ALPHA:
        return True, f"yes (tie: slower in {slower}/{len(ratios)} rounds, p={p:.2f})"
    return False, f"NO (slower in {slower}/{len(ratios)} rounds, p={p:.3f})"


def op_counts(model: ModelProto) -> dict[str, Any]:
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "nodes": len(model.graph.node),
        "BatchNormalization": ops.get("BatchNormalization", 0),
        "initializers": len(model.graph.initializer),
        "ops": dict(sorted(ops.items())),
    }


def session_options(level: str, threads: int, optimized_path: str | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = OPT_LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return so


def ort_node_count(model_bytes: bytes, level: str, threads: int) -> int | None:
    """Nodes ONNX Runtime actually runs after its own graph optimisations at ``level``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(model_bytes, session_options(level, threads, path), providers=["CPUExecutionProvider"])
            return len(onnx.load(path, load_external_data=False).graph.node)
        except Exception:  # an EP-specific op the serialiser refuses: the count is context, not a result
            return None


def build_variants(name: str, make: Callable[[], ModelProto]) -> tuple[dict[str, ModelProto], dict[str, Any]]:
    original = make()
    meta: dict[str, Any] = {}
    tick = time.perf_counter()
    result = converter.convert(original)
    meta["bnfold_seconds"] = time.perf_counter() - tick
    meta["bnfold_folded"] = sum(1 for layer in result.report.layers if layer.action == "folded")
    tick = time.perf_counter()
    simplified, check_ok = onnxsim.simplify(original, **ONNXSIM_OPTIONS)
    meta["onnxsim_seconds"] = time.perf_counter() - tick
    meta["onnxsim_check_ok"] = bool(check_ok)
    variants = {"original": original, "bnfold": result.model, "onnxsim": simplified}
    for variant, model in variants.items():
        if variant != "original" and op_counts(model)["BatchNormalization"]:
            print(f"warning: {name}/{variant} still has BatchNormalization nodes", file=sys.stderr)
    return variants, meta


def measure(cells: list[Cell], feed: dict[str, np.ndarray], rounds: int, iters: int, warmup: int) -> None:
    for cell in cells:
        for _ in range(warmup):
            cell.session.run(None, feed)
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.network, cell.level), []).append(cell)
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for group in groups.values():
                k = r % len(group)
                order = group[k:] + group[:k]  # rotate who goes first
                times: dict[int, list[float]] = {id(cell): [] for cell in group}
                for _ in range(iters):
                    for cell in order:  # one run each, in turn: drift within a round hits all variants alike
                        t0 = time.perf_counter_ns()
                        cell.session.run(None, feed)
                        times[id(cell)].append((time.perf_counter_ns() - t0) / 1e6)
                for cell in group:
                    cell.rounds.append(times[id(cell)])
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        gc.enable()


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    feed = {"input": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}
    cells: list[Cell] = []
    networks: dict[str, Any] = {}
    for name, make in NETWORKS.items():
        print(f"building {name} and its variants", file=sys.stderr, flush=True)
        variants, meta = build_variants(name, make)
        info: dict[str, Any] = {"convert": meta, "variants": {}}
        reference = None
        for variant, model in variants.items():
            data = model.SerializeToString()
            entry: dict[str, Any] = {"graph": op_counts(model), "ort_nodes": {}}
            for level in OPT_LEVELS:
                sess = ort.InferenceSession(
                    data, session_options(level, args.threads), providers=["CPUExecutionProvider"]
                )
                out = sess.run(None, feed)[0]
                if reference is None:
                    reference = out
                entry.setdefault("max_abs_diff", {})[level] = float(np.max(np.abs(out - reference)))
                entry["ort_nodes"][level] = ort_node_count(data, level, args.threads)
                cells.append(Cell(name, level, variant, sess))
            info["variants"][variant] = entry
        networks[name] = info
    print(
        f"measuring: {args.rounds} rounds × {args.iters} iterations, {args.threads} intra-op thread(s)",
        file=sys.stderr,
        flush=True,
    )
    measure(cells, feed, args.rounds, args.iters, args.warmup)

    rows = []
    for name, info in networks.items():
        for level in OPT_LEVELS:
            group = {c.variant: c for c in cells if c.network == name and c.level == level}
            base = group["original"]
            for variant in VARIANTS:
                cell = group[variant]
                ms = cell.all_ms()
                per_round = [
                    statistics.median(a) / statistics.median(b) for a, b in zip(cell.rounds, base.rounds, strict=True)
                ]
                stats = {
                    "median_ms": statistics.median(ms),
                    "p90_ms": percentile(ms, 90),
                    "min_ms": min(ms),
                    "ratio_to_original": statistics.median(per_round),
                    "ratio_per_round": per_round,
                    "samples": len(ms),
                }
                info["variants"][variant].setdefault("latency", {})[level] = stats
                row = {"network": name, "level": level, "variant": variant, **stats}
                row["nodes"] = info["variants"][variant]["graph"]["nodes"]
                row["ort_nodes"] = info["variants"][variant]["ort_nodes"][level]
                rows.append(row)
            fold, sim = group["bnfold"], group["onnxsim"]
            vs_orig = info["variants"]["bnfold"]["latency"][level]["ratio_per_round"]
            vs_sim = [statistics.median(a) / statistics.median(b) for a, b in zip(fold.rounds, sim.rounds, strict=True)]
            ok_orig, text_orig = not_slower(vs_orig)
            ok_sim, text_sim = not_slower(vs_sim)
            info.setdefault("targets", {})[level] = {
                "bnfold_not_slower_than_original": {"met": ok_orig, "verdict": text_orig},
                "bnfold_at_least_as_fast_as_onnxsim": {
                    "met": ok_sim,
                    "verdict": text_sim,
                    "ratio_bnfold_to_onnxsim": statistics.median(vs_sim),
                    "ratio_per_round": vs_sim,
                },
            }
    return {
        "benchmark": "inference",
        "settings": {
            "batch": 1,
            "input": [1, 3, 224, 224],
            "dtype": "float32",
            "provider": "CPUExecutionProvider",
            "intra_op_num_threads": args.threads,
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "rounds": args.rounds,
            "iters_per_round": args.iters,
            "warmup": args.warmup,
            "quick": args.quick,
            "ratio": "median over rounds of (variant round median / original round median)",
            "target_verdict": f"met unless median ratio > 1 and a one-sided sign test over rounds gives p < {ALPHA}",
            "onnxsim_options": ONNXSIM_OPTIONS,
            "bnfold_options": "converter.convert(model) defaults: bn='fold', verify=True",
        },
        "machine": {
            **host(),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "onnxsim": onnxsim.__version__,
            "numpy": np.__version__,
        },
        "git": git_state("converter"),
        "networks": networks,
        "rows": rows,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'network':<13} {'ORT level':<11} {'variant':<8} {'nodes':>5} {'ORT':>4} "
        f"{'median ms':>9} {'p90 ms':>8} {'vs orig':>7}"
    )
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        ort_nodes = "?" if row["ort_nodes"] is None else str(row["ort_nodes"])
        lines.append(
            f"{row['network']:<13} {row['level']:<11} {row['variant']:<8} {row['nodes']:>5} {ort_nodes:>4} "
            f"{row['median_ms']:>9.2f} {row['p90_ms']:>8.2f} {row['ratio_to_original']:>7.3f}"
        )
    lines.append("")
    lines.append("Targets (per-round paired ratios; a tie means slower by no more than noise):")
    for name, info in result["networks"].items():
        for level, t in info["targets"].items():
            a = t["bnfold_not_slower_than_original"]
            b = t["bnfold_at_least_as_fast_as_onnxsim"]
            ratio_orig = info["variants"]["bnfold"]["latency"][level]["ratio_to_original"]
            lines.append(
                f"  {name:<13} {level:<11} bnfold/original {ratio_orig:.3f}: {a['verdict']};  "
                f"bnfold/onnxsim {b['ratio_bnfold_to_onnxsim']:.3f}: {b['verdict']}"
            )
    s = result["settings"]
    m = result["machine"]
    lines.append("")
    lines.append(
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs); onnxruntime {m['onnxruntime']}, onnxsim {m['onnxsim']}; "
        f"intra_op {s['intra_op_num_threads']}, inter_op 1; {s['rounds']} rounds × {s['iters_per_round']} iters"
    )
    lines.append("nodes: graph nodes in the file; ORT: nodes ONNX Runtime runs after its own optimisations")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="round-robin rounds (default 30)")
    p.add_argument("--iters", type=int, default=10, help="timed runs per variant per round (default 10)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per session first (default 10)")
    p.add_argument("--threads", type=int, default=1, help="ORT intra_op_num_threads (default 1)")
    p.add_argument("--quick", action="store_true", help="fast sanity run: 3 rounds × 3 iters, 2 warm-up runs")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.warmup = 3, 3, 2
    if min(args.rounds, args.iters, args.threads) < 1 or args.warmup < 0:
        p.error("--rounds, --iters and --threads must be at least 1, --warmup at least 0")
    result = run(args)
    text = table(result)
    emit(result, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
