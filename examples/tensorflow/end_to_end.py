"""TensorFlow end to end: a hand-written BatchNorm, trained, saved, folded with bnfold, served.

    python -m examples.tensorflow.end_to_end              # needs: pip install ".[tensorflow]" (httpx to query)
    python -m examples.tensorflow.end_to_end --no-serve   # stop after converting

1. Synthetic bars (12×12×1 NHWC images, horizontal or vertical), seeded, so no download is needed.
2. :class:`examples.tensorflow.manual_bn.ManualBNNet`: conv → BN → conv → BN → dense → BN → dense, its BN written
   by hand (``tf.nn.moments``, moving averages with momentum, ``is_training``, ``tf.nn.batch_normalization``),
   trained for a few SGD steps with the BN in training mode.
3. ``tf.saved_model.save`` with the inference branch as ``serving_default`` — what a training job hands over.
4. ``bnfold convert manual_bn/ -o manual_bn.onnx``: tf2onnx export (BN left as Mul/Add), every BN folded,
   verified against the exported ONNX and against TensorFlow's inference outputs.
5. ``bnfold serve manual_bn.onnx`` in a subprocess, and a few Open Inference Protocol V2 requests with httpx.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from converter import cli as converter_cli
from converter.frontends import tensorflow as tf_frontend
from examples import scratch
from examples.tensorflow import manual_bn
from service.launcher import LaunchError, bnfold_command, free_port, launch

SEED = 0


def serve_and_query(model: Path, images: np.ndarray, port: int) -> int:
    """Start ``bnfold serve MODEL`` and send V2 requests; 0 when every answer equals ONNX Runtime's."""
    try:
        import httpx  # noqa: PLC0415 - only this step needs it
    except ImportError:
        print("skipping the serving step: httpx is not installed (pip install httpx)")
        return 0
    command = bnfold_command()
    if command is None:
        print("skipping the serving step: `bnfold serve` is not available")
        return 0
    name = model.stem
    print(f"$ bnfold serve {model} --host 127.0.0.1 --port {port}")
    try:
        server = launch(
            [str(model), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"],
            command=[*command, "serve"],
            port=port,
            timeout=60,
            log=model.with_suffix(".server.log"),  # beside the model: removed with the run's folder
        )
    except LaunchError as exc:
        print(f"the server did not become ready: {exc}")
        return 1
    base = server.url
    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        agree = 0
        with httpx.Client(base_url=base, timeout=30) as client:
            for image in images:
                want = sess.run(["logits"], {"image": image[None]})[0][0]
                body = {"inputs": [{"name": "image", "shape": [1, *image.shape], "datatype": "FP32",
                                    "data": image.ravel().tolist()}]}  # fmt: skip
                response = client.post(f"/v2/models/{name}/infer", json=body)
                response.raise_for_status()
                got = np.asarray(response.json()["outputs"][0]["data"], np.float32)
                agree += bool(np.allclose(got, want, rtol=1e-6, atol=1e-6))
                print(f"  POST /v2/models/{name}/infer -> {manual_bn.CLASSES[int(np.argmax(got))]}")
        print(f"served answers equal to ONNX Runtime's: {agree}/{len(images)}")
        return 0 if agree == len(images) else 1
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write manual_bn/ and its .onnx (default: temporary)")
    parser.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    parser.add_argument("--port", type=int, help="port for bnfold serve (default: a free one)")
    parser.add_argument("--no-serve", action="store_true", help="stop after converting")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder and the server's log (default: removed)"
    )
    args = parser.parse_args(argv)
    with scratch.workdir(args.workdir, "bnfold-tensorflow-", args.keep) as workdir:
        return walk_through(args, workdir)


def walk_through(args: argparse.Namespace, workdir: Path) -> int:

    print(f"1-2. training a hand-written BatchNorm network on synthetic bars ({args.steps} steps)")
    net, accuracy = manual_bn.train(args.steps, SEED)
    print(f"  held-out accuracy {accuracy:.1%}")
    saved, out, report = workdir / "manual_bn", workdir / "manual_bn.onnx", workdir / "manual_bn.report.json"
    manual_bn.save(net, saved)
    print(f"3. saved the inference branch as a SavedModel: {saved}")

    print(f"4. $ bnfold convert {saved} -o {out}")
    code = converter_cli.main(["convert", str(saved), "-o", str(out), "--report", str(report)])
    if code != 0:
        return code
    layers = json.loads(report.read_text())["layers"]
    left = tf_frontend.affine_pairs(onnx.load(str(out)))
    folded = sum(r["action"] == "folded" for r in layers)
    print(f"  {folded} per-channel maps folded (BatchNorms, and a conv bias Add); left: {left}")
    images, _ = manual_bn.make_bars(100, np.random.default_rng(SEED + 2))
    want = manual_bn.inference(net, images)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"image": images})[0]
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"  ONNX model vs TensorFlow inference on 100 images: max rel error {rel:.2e}")
    if rel > 1e-5 or left != {"batchnorm": 0, "mul_add": 0}:
        return 1
    if args.no_serve:
        return 0
    print("5. serving it")
    return serve_and_query(out, images[:6], args.port or free_port())


if __name__ == "__main__":
    sys.exit(main())
