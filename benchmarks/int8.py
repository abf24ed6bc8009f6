"""INT8 after the fold: batch-1 latency on one thread, agreement with the float model, the peer, conversion cost.

Networks: ``converter.zoo.resnet((3, 4, 6, 3), True)`` (ResNet-50 shape) and ``zoo.resnet()`` (ResNet-18),
1×3×224×224, random-init weights with trained-looking BN statistics, calibrated and compared on synthetic
natural-image-like inputs (1/f spectrum, correlated colour, ImageNet mean/std normalisation; never the
same images for calibration and comparison); and the bundled digits model, calibrated on its shipped
``service/models/digits/samples.npz`` (100 held-out digits) and compared on the other 350 held-out digits of
the fixed split (``examples.digits.data``), where its accuracy against the labels is measured too.

Variants, each a model file run in ONNX Runtime with every graph optimisation on (what a deployment runs), one
intra-op and one inter-op thread, batch 1:

- ``float``: the original model (BN kept; ONNX Runtime fuses Conv+BN itself at this level);
- ``bnfold int8``: ``convert(model, int8=..., inputs=calibration)``: bnfold folds, then ONNX Runtime's static
  quantization (QDQ, per-channel int8 weights, uint8 activations, MinMax);
- ``ort quantize_static``: the peer, ``onnxruntime.quantization.quantize_static`` on the unfolded model with
  the same settings and calibration samples;
- ``ort pre_process + quantize_static``: the peer as its documentation advises, ``quant_pre_process`` first.

Latency: sessions made up front and warmed up, then rounds in which every variant runs ``--runs`` times (the
order rotates each round); a round's figure is its median, the speed-up is float over variant within a round,
reported as the median over rounds (min..max). Conversion cost on the ResNet-50 shape: ``bnfold convert
--int8`` (fold, verify the fold, calibrate, quantize, prove on the held-out fifth of the samples, write) and
the two peers (quantize only, every sample calibrating), each a child process (wall time, peak RSS from
``wait4``), measured first, while this process is small (Linux counts the parent's memory at ``exec`` in the
child's peak), with the float conversion for context.

Goals: ResNet-50 shape INT8 >= 1.8x faster than float; digits INT8 top-1 agreement with float >= 99% on the
held-out digits and accuracy within 0.5 points of the float model's.

    .venv/bin/python -m benchmarks.int8            # full run, writes benchmarks/results/int8.json
    .venv/bin/python -m benchmarks.int8 --quick    # direction only (a minute or two)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.conversion import run_child
from benchmarks.environment import ROOT, emit, git_state, host

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "int8.json"
DIGITS = ROOT / "service" / "models" / "digits" / "1" / "model.onnx"
DIGITS_SAMPLES = ROOT / "service" / "models" / "digits" / "samples.npz"
VARIANTS = ("float", "bnfold int8", "ort quantize_static", "ort pre_process + quantize_static")
SPEEDUP_GOAL = 1.8
AGREEMENT_GOAL = 0.99
ACCURACY_POINTS = 0.5
#: The child that writes the ResNet-50 shape and its calibration samples (keeps this process small).
BUILD = (
    "import sys, numpy as np, onnx; from converter import zoo; from benchmarks.int8 import natural_images; "
    "onnx.save(zoo.resnet((3, 4, 6, 3), bottleneck=True), sys.argv[1]); "
    "np.savez(sys.argv[2], input=natural_images(int(sys.argv[3]), 224, seed=1))"
)


def natural_images(count: int, size: int, seed: int) -> Any:
    """``count`` images ``(count, 3, size, size)`` float32 with natural-image statistics: a 1/f amplitude
    spectrum, colour channels mostly shared, values in [0, 1], then ImageNet's mean/std normalisation."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    out = np.empty((count, 3, size, size), np.float32)
    for i in range(count):
        noise = rng.standard_normal((4, size, size // 2 + 1)) + 1j * rng.standard_normal((4, size, size // 2 + 1))
        planes = np.fft.irfft2(noise * amplitude, s=(size, size))
        img = 0.8 * planes[:1] + 0.2 * planes[1:]  # a shared luminance plus a little per-channel colour
        img = (img - img.mean()) / (4 * img.std()) + rng.uniform(0.35, 0.6)
        out[i] = (np.clip(img, 0, 1) - mean) / std
    return out


# ------------------------------------------------------------------------------------------------------------
# conversion cost (child processes, first)


def conversion_cost(tmp: Path, samples: int, reps: int) -> dict[str, Any]:
    model, calib = tmp / "resnet50.onnx", tmp / "resnet50_samples.npz"
    subprocess.run([sys.executable, "-c", BUILD, str(model), str(calib), str(samples)], cwd=ROOT, check=True)
    bnfold = [sys.executable, "-m", "converter", "convert", str(model), "-q"]
    peer = "import sys; from pathlib import Path; from benchmarks.int8 import ort_peer; "
    peer += "ort_peer(*map(Path, sys.argv[1:4]), {})"

    def ort(pre: bool) -> list[str]:
        return [sys.executable, "-c", peer.format(pre), str(model), str(tmp / f"peer{pre}.onnx"), str(calib)]

    commands = {
        "bnfold convert --int8": [*bnfold, "-o", str(tmp / "r50.int8.onnx"), "--int8", "--inputs", str(calib)],
        "ort quantize_static": ort(False),
        "ort pre_process + quantize_static": ort(True),
        "bnfold convert (float, context)": [*bnfold, "-o", str(tmp / "r50.folded.onnx")],
    }
    out: dict[str, Any] = {"model_bytes": model.stat().st_size, "samples": samples, "commands": {}}
    for label, argv in commands.items():
        runs = [run_child(argv, ROOT) for _ in range(reps)]
        out["commands"][label] = {
            "argv": argv[1:],
            "median_wall_s": statistics.median(r["wall_s"] for r in runs),
            "median_maxrss_mib": statistics.median(r["maxrss_kib"] for r in runs) / 1024,
            "median_cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in runs),
        }
    out["int8_bytes"] = (tmp / "r50.int8.onnx").stat().st_size
    return out


# ------------------------------------------------------------------------------------------------------------
# variants, agreement, latency (in this process)


def ort_peer(src: Path, dst: Path, samples: Path, pre: bool) -> None:
    """The peer: ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax, as bnfold) on
    ``src`` calibrated on every sample of the ``samples`` .npz, after ``quant_pre_process`` when ``pre``."""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    with np.load(samples) as archive:
        (name,) = archive.files
        values = np.asarray(archive[name])

    class Reader:
        def __init__(self) -> None:
            self.feeds = iter([{name: values[i : i + 1]} for i in range(len(values))])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.feeds, None)

    if pre:
        processed = dst.with_name(dst.stem + ".pre.onnx")
        quant_pre_process(str(src), str(processed))
        src = processed
    quantize_static(
        str(src),
        str(dst),
        Reader(),  # type: ignore[arg-type]
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )


def variants(tmp: Path, name: str, original: Path, calibration: Any, input_name: str) -> dict[str, dict[str, Any]]:
    """Write every variant of ``original`` into ``tmp``; their paths and conversion wall times."""
    import numpy as np
    import onnx

    from converter import Int8Options, convert

    calib_file = tmp / f"{name}_calibration.npz"
    np.savez(calib_file, **{input_name: calibration})
    out: dict[str, dict[str, Any]] = {"float": {"path": original, "seconds": 0.0}}
    start = time.perf_counter()
    # every sample calibrates, as for the peer; agreement is measured below on other inputs
    # (bnfold's own proof then reuses them: thresholds off, it reports and never refuses here)
    options = Int8Options(verify_inputs=(str(calib_file),), min_top1=0, min_snr_db=-1e9)
    result = convert(str(original), int8=options, inputs=[calib_file])
    path = tmp / f"{name}.bnfold.int8.onnx"
    onnx.save(result.model, str(path))
    out["bnfold int8"] = {"path": path, "seconds": time.perf_counter() - start}
    for label, pre in (("ort quantize_static", False), ("ort pre_process + quantize_static", True)):
        start = time.perf_counter()
        path = tmp / f"{name}.{'pre' if pre else 'ort'}.int8.onnx"
        ort_peer(original, path, calib_file, pre)
        out[label] = {"path": path, "seconds": time.perf_counter() - start}
    for v in out.values():
        model = onnx.load(str(v["path"]))
        ops = [n.op_type for n in model.graph.node]
        v.update(bytes=v["path"].stat().st_size, nodes=len(ops), batchnorms=ops.count("BatchNormalization"))
        v.update(dequantize=ops.count("DequantizeLinear"))
    return out


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def agreement(sessions: dict[str, Any], inputs: Any, input_name: str, labels: Any = None) -> dict[str, Any]:
    """Each variant against ``float`` on ``inputs`` (one at a time): top-1 agreement, top-5 overlap, SNR,
    and accuracy when ``labels`` are given."""
    import numpy as np

    from converter.quant_report import snr_db
    from converter.verify import class_agreement

    outputs = {
        k: [np.asarray(s.run(None, {input_name: inputs[i : i + 1]})[0]) for i in range(len(inputs))]
        for k, s in sessions.items()
    }
    want = outputs["float"]
    out: dict[str, Any] = {}
    for k, got in outputs.items():
        found = class_agreement(got, want)
        assert found is not None
        top1, topk, kk = found
        row = {"top1": top1, f"top{kk}_overlap": topk, "snr_db": snr_db(np.concatenate(got), np.concatenate(want))}
        if labels is not None:
            row["accuracy"] = float(np.mean(np.concatenate(got).argmax(axis=1) == labels))
        out[k] = row
    return out


def latency(sessions: dict[str, Any], x: Any, input_name: str, rounds: int, runs: int) -> dict[str, Any]:
    feed = {input_name: x}
    names = list(sessions)
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    per_round: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                sessions[k].run(None, feed)
                times.append(time.perf_counter() - start)
            per_round[k].append(statistics.median(times))
    out: dict[str, Any] = {}
    for k in names:
        ratios = [f / v for f, v in zip(per_round["float"], per_round[k], strict=True)]
        out[k] = {
            "median_ms": 1000 * statistics.median(per_round[k]),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
        }
    return out


def network(tmp: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import onnx

    from converter import zoo

    if name == "digits":
        from examples.digits.data import load_split

        with np.load(DIGITS_SAMPLES) as archive:
            calibration = np.asarray(archive["pixels"])
        split = load_split()
        held = split.x_test[len(calibration) :].astype(np.float32)
        labels = split.y_test[len(calibration) :]
        original, input_name = DIGITS, "pixels"
    else:
        model = zoo.resnet((3, 4, 6, 3), bottleneck=True) if name == "resnet50" else zoo.resnet()
        original, input_name, labels = tmp / f"{name}.onnx", "input", None
        onnx.save(model, str(original))
        del model
        calibration = natural_images(args.calibration, 224, seed=1)
        held = natural_images(args.compare, 224, seed=2)
    built = variants(tmp, name, original, calibration, input_name)
    sessions = {k: session(v["path"], args.threads) for k, v in built.items()}
    result = {
        "calibration_samples": len(calibration),
        "compared_on": len(held),
        "variants": {k: {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in built.items()},
        "agreement": agreement(sessions, held, input_name, labels),
        "latency": latency(sessions, held[:1], input_name, args.rounds, args.runs),
    }
    del sessions
    return result


# ------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    machine = host()
    cost = conversion_cost(tmp, args.calibration + args.calibration // 4, args.reps)  # 1 in 5 held out by bnfold
    import onnxruntime as ort

    networks = {name: network(tmp, name, args) for name in args.networks}
    goals: dict[str, Any] = {}
    if "resnet50" in networks:
        speedup = networks["resnet50"]["latency"]["bnfold int8"]["speedup"]
        goals["resnet50_int8_speedup"] = {
            "goal": f">= {SPEEDUP_GOAL}x",
            "value": speedup,
            "met": speedup >= SPEEDUP_GOAL,
        }
    if "digits" in networks:
        a = networks["digits"]["agreement"]
        top1 = a["bnfold int8"]["top1"]
        drop = 100 * (a["float"]["accuracy"] - a["bnfold int8"]["accuracy"])
        goals["digits_top1_agreement"] = {
            "goal": f">= {AGREEMENT_GOAL:.0%}",
            "value": top1,
            "met": top1 >= AGREEMENT_GOAL,
        }
        goals["digits_accuracy_points_lost"] = {
            "goal": f"<= {ACCURACY_POINTS}",
            "value": drop,
            "met": drop <= ACCURACY_POINTS,
        }
    return {
        "benchmark": "int8",
        "settings": vars(args) | {"out": str(args.out)},
        "machine": {**machine, "onnxruntime": ort.__version__, "cpu_flags": _cpu_flags()},
        "git": git_state("converter", "benchmarks"),
        "conversion": cost,
        "networks": networks,
        "goals": goals,
        "load_average_at_end": list(os.getloadavg()),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"{m['cpu']}, {m['usable_cpus']} usable CPUs, flags {' '.join(m['cpu_flags']) or '-'}; onnxruntime "
        f"{m['onnxruntime']}; load average at start {m.get('loadavg_at_start', ['?'])[0]}, at end "
        f"{result['load_average_at_end'][0]:.2f}",
        f"batch 1, {result['settings']['threads']} thread(s), ORT_ENABLE_ALL; latency: median of "
        f"{result['settings']['rounds']} rounds x {result['settings']['runs']} runs; speed-up vs float per round",
        "",
        f"{'network':<9} {'variant':<35} {'ms':>8} {'speed-up':>18} {'top-1':>7} {'top-5':>7} {'SNR dB':>7} "
        f"{'acc':>6} {'MB':>6} {'BN':>3} {'convert s':>9}",
    ]
    for name, n in result["networks"].items():
        for k in VARIANTS:
            lat, agr, var = n["latency"][k], n["agreement"][k], n["variants"][k]
            speed = f"{lat['speedup']:.2f}x ({lat['speedup_min']:.2f}-{lat['speedup_max']:.2f})"
            topk = next(v for kk, v in agr.items() if kk.endswith("_overlap"))
            acc = f"{100 * agr['accuracy']:.2f}" if "accuracy" in agr else "-"
            snr = "-" if k == "float" else f"{agr['snr_db']:.1f}"
            lines.append(
                f"{name:<9} {k:<35} {lat['median_ms']:>8.3f} {speed:>18} {agr['top1']:>7.1%} {topk:>7.1%} "
                f"{snr:>7} {acc:>6} {var['bytes'] / 1e6:>6.2f} {var['batchnorms']:>3} {var['seconds']:>9.2f}"
            )
        lines.append(f"{'':<9} calibrated on {n['calibration_samples']}, compared on {n['compared_on']} other inputs")
    c = result["conversion"]
    lines += ["", f"conversion, ResNet-50 shape ({c['model_bytes'] / 2**20:.1f} MiB; {c['samples']} samples):"]
    for label, r in c["commands"].items():
        lines.append(
            f"  {label:<34} wall {r['median_wall_s']:.2f} s, CPU {r['median_cpu_s']:.2f} s, "
            f"peak RSS {r['median_maxrss_mib']:.0f} MiB"
        )
    lines.append(f"  INT8 file {c['int8_bytes'] / 2**20:.1f} MiB")
    lines.append("")
    for key, g in result["goals"].items():
        value = g["value"]
        shown = f"{value:.1%}" if "agreement" in key else f"{value:.2f}"
        lines.append(f"goal {key}: {shown} (goal {g['goal']}): {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few samples, rounds and runs: direction only")
    p.add_argument("--networks", nargs="+", default=["resnet50", "resnet18", "digits"])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    quick = args.quick
    args.calibration, args.compare = (16, 8) if quick else (100, 50)
    args.rounds, args.runs, args.reps = (3, 3, 1) if quick else (15, 10, 3)
    with tempfile.TemporaryDirectory(prefix="bnfold-int8-bench-") as tmp:
        result = run(args, Path(tmp))
    emit(result, table(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
