"""Converting a ResNet-50-sized model: wall time and peak RSS of ``bnfold convert`` vs ``onnxsim``.

The model is ``converter.zoo.resnet((3, 4, 6, 3), bottleneck=True)`` (25.6 M parameters, ~98 MiB), saved
to a temporary file. Each command runs as its own child process, several repetitions, the commands taking
turns (the order rotates every repetition) after one untimed warm-up run each (so the input file is in
the page cache for all). Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (KiB on Linux).

Linux counts the memory of the parent at the moment of ``exec`` in the child's ``ru_maxrss``, so this
script keeps its own process small: it imports nothing heavy until every measurement is done, and builds
the model in a child process. ``/bin/true`` is measured the same way to show that floor.

Commands (the two targets compare the first two):

- ``bnfold convert IN -o OUT``: fold, write, and verify (the default): both models run in ONNX Runtime on
  one seeded random input and every output is compared.
- ``onnxsim IN OUT``: its default ``check_n=0``; its only check is then ``onnx.checker.check_model`` on
  the result (no ONNX Runtime comparison of outputs).
- extras, for context: ``onnxsim IN OUT 1`` (one ORT comparison of original vs simplified, the check
  closest to bnfold's; looser tolerances, see ``ONNXSIM_CHECK_TOLERANCES``), ``bnfold convert --no-verify``,
  and a bare ``python -c "import onnx, onnxruntime"``.

    .venv/bin/python -m benchmarks.conversion            # writes benchmarks/results/conversion.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.environment import emit, git_state, host

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "conversion.json"
BIN = Path(sys.executable).parent
#: With its default elementwise tolerances (rtol 1e-4, atol 1e-5) onnxsim's ORT check fails on this model's
#: near-zero logits (float32 reordering: max |Δ| 5e-4 on logits up to ~1400), and it then exits 1. The check
#: costs the same at any tolerance, so the context run loosens it.
ONNXSIM_CHECK_TOLERANCES = ["--check-rtol", "1e-3", "--check-atol", "1e-2"]
BUILD = "import sys, onnx; from converter import zoo; onnx.save(zoo.resnet((3, 4, 6, 3), bottleneck=True), sys.argv[1])"


@dataclass
class Command:
    key: str
    label: str
    argv: list[str]
    output: Path | None  # file the command writes (removed before each run)
    target: bool = True  # part of a target comparison (else context)
    runs: list[dict[str, float]] = field(default_factory=list)

    def median(self, what: str) -> float:
        return statistics.median(r[what] for r in self.runs)


def tool(name: str) -> str:
    """The console script installed next to this Python (the venv's), else whatever is on PATH."""
    candidate = BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not found next to {sys.executable} nor on PATH")
    return found


def clean(path: Path | None) -> None:
    if path is None:
        return
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def run_child(argv: Sequence[str], cwd: Path) -> dict[str, float]:
    """Run ``argv`` to completion; wall seconds, the child's peak RSS (KiB) and CPU seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()  # the commands write little; read it before waiting so the pipe cannot fill
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n" + "\n".join(tail))
    return {
        "wall_s": wall,
        "maxrss_kib": float(usage.ru_maxrss),
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
    }


def describe_outputs(model_in: Path, commands: list[Command]) -> dict[str, Any]:
    """After all timing: what each command wrote (node and BN counts, size). Heavy imports happen here."""
    import onnx

    def info(path: Path) -> dict[str, Any]:
        m = onnx.load(str(path), load_external_data=False)
        data = path.with_name(path.name + ".data")
        return {
            "nodes": len(m.graph.node),
            "BatchNormalization": sum(n.op_type == "BatchNormalization" for n in m.graph.node),
            "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
            "external_data": data.exists(),
        }

    out = {"input": info(model_in)}
    for c in commands:
        if c.output is not None and c.output.exists():
            out[c.key] = info(c.output)
    return out


def versions() -> dict[str, str]:
    """Package versions, asked of a child (so that this process stays small until the end)."""
    code = (
        "import json, onnx, onnxruntime, onnxsim, numpy, sys; print(json.dumps({'python': sys.version.split()[0], "
        "'onnx': onnx.__version__, 'onnxruntime': onnxruntime.__version__, 'onnxsim': onnxsim.__version__, "
        "'numpy': numpy.__version__}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result: dict[str, str] = json.loads(done.stdout)
    return result


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    model_in = tmp / "resnet50.onnx"
    print(f"building ResNet-50 into {model_in}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", BUILD, str(model_in)], check=True)
    bnfold, onnxsim = tool("bnfold"), tool("onnxsim")
    out_b, out_s = tmp / "bnfold.onnx", tmp / "onnxsim.onnx"
    commands = [
        Command("bnfold", "bnfold convert IN -o OUT", [bnfold, "convert", str(model_in), "-o", str(out_b)], out_b),
        Command("onnxsim", "onnxsim IN OUT", [onnxsim, str(model_in), str(out_s)], out_s),
    ]
    if not args.no_extras:
        out_s1, out_nv = tmp / "onnxsim_check1.onnx", tmp / "bnfold_noverify.onnx"
        commands += [
            Command(
                "onnxsim_check1",
                "onnxsim IN OUT 1 (+tolerances)",
                [onnxsim, str(model_in), str(out_s1), "1", *ONNXSIM_CHECK_TOLERANCES],
                out_s1,
                False,
            ),
            Command(
                "bnfold_noverify",
                "bnfold convert --no-verify",
                [bnfold, "convert", str(model_in), "-o", str(out_nv), "--no-verify"],
                out_nv,
                False,
            ),
        ]
    commands += [
        Command(
            "import_baseline",
            'python -c "import onnx, onnxruntime"',
            [sys.executable, "-c", "import onnx, onnxruntime"],
            None,
            False,
        ),
        Command("true_floor", "/bin/true (floor)", ["/bin/true"], None, False),
    ]
    parent_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("warm-up run of each command", file=sys.stderr, flush=True)
    for c in commands:
        clean(c.output)
        run_child(c.argv, tmp)
    for rep in range(args.reps):
        k = rep % len(commands)
        for c in commands[k:] + commands[:k]:
            clean(c.output)
            c.runs.append(run_child(c.argv, tmp))
        line = ", ".join(f"{c.key} {c.runs[-1]['wall_s']:.1f}s" for c in commands if c.target)
        print(f"  rep {rep + 1}/{args.reps}: {line}", file=sys.stderr, flush=True)
    parent_after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    outputs = describe_outputs(model_in, commands)
    results = {
        c.key: {
            "command": c.label,
            "argv": [Path(a).name if i == 0 else a for i, a in enumerate(c.argv)],
            "median_wall_s": c.median("wall_s"),
            "median_maxrss_mib": c.median("maxrss_kib") / 1024,
            "median_user_s": c.median("user_s"),
            "median_sys_s": c.median("sys_s"),
            "runs": c.runs,
        }
        for c in commands
    }
    b, s = results["bnfold"], results["onnxsim"]
    time_ratio = b["median_wall_s"] / s["median_wall_s"]
    cpu_ratio = (b["median_user_s"] + b["median_sys_s"]) / (s["median_user_s"] + s["median_sys_s"])
    rss_ratio = b["median_maxrss_mib"] / s["median_maxrss_mib"]
    return {
        "benchmark": "conversion",
        "model": {
            "builder": "converter.zoo.resnet((3, 4, 6, 3), bottleneck=True)",
            "file_bytes": model_in.stat().st_size,
        },
        "settings": {"reps": args.reps, "warmup": 1, "order": "rotated every repetition"},
        "machine": {**host(), **versions()},
        "git": git_state("converter"),
        "parent_maxrss_kib": {"before_runs": parent_kib, "after_runs": parent_after_kib},
        "results": results,
        "outputs": outputs,
        "ratios": {
            "time_bnfold_over_onnxsim": time_ratio,
            "cpu_time_bnfold_over_onnxsim": cpu_ratio,
            "rss_bnfold_over_onnxsim": rss_ratio,
        },
        "load_average": _loadavg(),
        "targets": {
            "bnfold_faster_than_onnxsim": {"met": time_ratio < 1.0, "ratio": time_ratio},
            "bnfold_rss_at_most_half_of_onnxsim": {"met": rss_ratio <= 0.5, "ratio": rss_ratio},
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def table(result: dict[str, Any]) -> str:
    head = f"{'command':<36} {'wall s':>7} {'peak RSS MiB':>12} {'user s':>7} {'sys s':>6}  output"
    lines = [head, "-" * (len(head) + 24)]
    for key, r in result["results"].items():
        o = result["outputs"].get(key)
        out = (
            f"{o['nodes']} nodes, {o['BatchNormalization']} BN, {o['bytes'] / 2**20:.1f} MiB"
            + (" +.data" if o["external_data"] else "")
            if o
            else ""
        )
        lines.append(
            f"{r['command']:<36} {r['median_wall_s']:>7.2f} {r['median_maxrss_mib']:>12.1f} "
            f"{r['median_user_s']:>7.2f} {r['median_sys_s']:>6.2f}  {out}"
        )
    t = result["targets"]
    fast, small = t["bnfold_faster_than_onnxsim"], t["bnfold_rss_at_most_half_of_onnxsim"]
    i = result["outputs"]["input"]
    m = result["machine"]
    lines += [
        "",
        f"input: ResNet-50, {i['nodes']} nodes, {i['BatchNormalization']} BN, {i['bytes'] / 2**20:.1f} MiB; "
        f"medians of {result['settings']['reps']} repetitions",
        f"bnfold/onnxsim wall time {fast['ratio']:.3f}  -> target '< 1 (bnfold faster)': {verdict(fast['met'])}",
        f"bnfold/onnxsim CPU time  {result['ratios']['cpu_time_bnfold_over_onnxsim']:.3f}  (user+sys: less sensitive "
        f"to other load; 1-min load average {result['load_average']} at the end)",
        f"bnfold/onnxsim peak RSS  {small['ratio']:.3f}  -> target '<= 0.5': {verdict(small['met'])}",
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs, {m['memory']}); onnxruntime {m['onnxruntime']}, "
        f"onnxsim {m['onnxsim']}, onnx {m['onnx']}, Python {m['python']}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each command (default 5)")
    p.add_argument("--no-extras", action="store_true", help="only the two target commands and the baselines")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as tmp:
        result = run(args, Path(tmp))
    text = table(result)
    emit(result, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
