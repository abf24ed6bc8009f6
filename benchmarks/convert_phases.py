"""Where ``convert_file`` spends time and memory: RSS before, peak RSS during, and RSS after each phase.

A diagnostic for ``benchmarks/conversion.py``: it runs the real ``converter.convert_file`` on ResNet-50 (or a
given model) in this process, with its internal steps wrapped (in this process only) so that each phase's
peak is read from the kernel: ``VmHWM`` is reset through ``/proc/self/clear_refs`` at every phase boundary,
so a phase's peak also covers what the phases nested in it allocated. Linux only. Numbers are MiB.
Phases that the converter no longer has are skipped, so the script keeps working as the code changes.

    .venv/bin/python -m benchmarks.convert_phases                  # builds ResNet-50 into a temp dir
    .venv/bin/python -m benchmarks.convert_phases MODEL.onnx --no-verify
"""

from __future__ import annotations

import argparse
import functools
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.environment import emit

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "convert_phases.json"


def _status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Phases:
    def __init__(self) -> None:
        self.stack: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []

    def _fold_peak(self) -> None:
        hwm = _status()["VmHWM"]
        for frame in self.stack:
            frame["peak"] = max(frame["peak"], hwm)
        _reset_peak()

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            self._fold_peak()
            rss = _status()["VmRSS"]
            frame = {"label": label, "depth": len(self.stack), "rss_in": rss, "peak": rss, "t0": time.perf_counter()}
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._fold_peak()
                self.stack.pop()
                frame["rss_out"] = _status()["VmRSS"]
                frame["seconds"] = time.perf_counter() - frame.pop("t0")
                self.records.append(frame)

        setattr(owner, attr, inner)


def instrument(phases: Phases) -> None:
    import onnx
    import onnxruntime

    from converter import core, graph, modelio, rewrite, verify

    targets: list[tuple[Any, str, str]] = [
        (modelio, "load", "modelio.load"),
        (modelio, "check", "modelio.check"),
        (onnx, "load", "onnx.load"),
        (onnx, "load_model", "onnx.load_model"),
        (onnx.checker, "check_model", "onnx.checker.check_model"),
        (core, "rewrite", "rewrite.rewrite"),
        (rewrite, "ValueInfo", "shape inference (ValueInfo)"),
        (rewrite, "_fold_all", "rewrite._fold_all"),
        (graph.Graph, "prune", "Graph.prune"),
        (graph.Graph, "commit", "Graph.commit"),
        (modelio.Staged, "write", "Staged.write"),
        (onnx, "save_model", "onnx.save_model"),
        (core, "_verify", "core._verify"),
        (core, "verify", "verify.verify"),
        (verify, "session", "ORT session"),
        (onnxruntime.InferenceSession, "run", "ORT run"),
    ]
    for owner, attr, label in targets:
        phases.wrap(owner, attr, label)


def build_resnet50(path: Path) -> None:
    """In a child process, so that building leaves nothing in this one's heap."""
    code = "import sys, onnx; from converter import zoo; onnx.save(zoo.resnet((3, 4, 6, 3), True), sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


def run(src: Path, verify: bool) -> dict[str, Any]:
    import converter

    phases = Phases()
    with tempfile.TemporaryDirectory(prefix="bnfold-phases-") as tmp:
        dst = Path(tmp) / "out.onnx"
        start = _status()["VmRSS"]
        instrument(phases)
        _reset_peak()
        tick = time.perf_counter()
        report = converter.convert_file(src, dst, converter.Options(verify=verify))
        total = time.perf_counter() - tick
    peak = max([start, *(r["peak"] for r in phases.records)])
    return {
        "model": str(src),
        "model_mib": src.stat().st_size / 2**20,
        "verify": verify,
        "rss_before_mib": start,
        "peak_mib": peak,
        "seconds": total,
        "report_seconds": report.seconds,
        "phases": phases.records,
        "ru_maxrss_mib_after_reset": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def table(result: dict[str, Any]) -> str:
    head = f"{'phase (in call order of completion)':<42} {'RSS in':>7} {'peak':>7} {'RSS out':>7} {'secs':>6}"
    lines = [head, "-" * len(head)]
    for r in result["phases"]:
        label = "  " * r["depth"] + r["label"]
        lines.append(f"{label:<42} {r['rss_in']:>7.0f} {r['peak']:>7.0f} {r['rss_out']:>7.0f} {r['seconds']:>6.2f}")
    lines.append("")
    lines.append(
        f"model {result['model_mib']:.1f} MiB; RSS before {result['rss_before_mib']:.0f} MiB (imports); "
        f"peak {result['peak_mib']:.0f} MiB; convert_file {result['seconds']:.2f} s (verify={result['verify']})"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, help="ONNX model (default: ResNet-50 from converter.zoo)")
    p.add_argument("--no-verify", action="store_true", help="convert without the ONNX Runtime comparison")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bnfold-phases-in-") as tmp:
        src: Path = args.model
        if src is None:
            src = Path(tmp) / "resnet50.onnx"
            build_resnet50(src)
        result = run(src, verify=not args.no_verify)
    text = table(result)
    emit(result, text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
