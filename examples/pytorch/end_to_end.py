"""PyTorch end to end: train a small CNN with BatchNorm, save it as TorchScript, fold it with bnfold, serve it.

    python -m examples.pytorch.end_to_end                 # needs: pip install ".[torch]" (and httpx to query)
    python -m examples.pytorch.end_to_end --no-serve      # stop after converting

1. Synthetic "shapes" data (1×16×16 images of 4 classes: horizontal bars, vertical bars, a diagonal cross, a
   square ring; random position, contrast and noise), seeded, so no download is needed.
2. A CNN with four BatchNorms (Conv-BN-ReLU ×3, a Linear-BatchNorm1d head) trained for a few seconds.
3. ``torch.jit.script(model).save("shapes.pt")`` — the TorchScript file a training job would hand over.
4. ``bnfold convert shapes.pt -o shapes.onnx --input-shape 1,1,16,16``: export to ONNX (BatchNorm kept), fold
   every BatchNorm, verify against the exported ONNX in ONNX Runtime and against PyTorch's eval outputs.
5. ``bnfold serve shapes.onnx`` in a subprocess, and a few Open Inference Protocol V2 requests with httpx:
   ``POST /v2/models/shapes/infer``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray
from torch import nn

from converter import cli as converter_cli
from examples import scratch
from service.launcher import LaunchError, bnfold_command, free_port, launch

CLASSES = ("horizontal", "vertical", "cross", "ring")
SIZE = 16
SEED = 0


def make_shapes(n: int, rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """``n`` images (n, 1, 16, 16) and their labels."""
    labels = rng.integers(0, len(CLASSES), n)
    images = np.zeros((n, 1, SIZE, SIZE), np.float32)
    for i, label in enumerate(labels):
        img = images[i, 0]
        a, b = rng.integers(2, 6), rng.integers(10, 14)  # the shape's extent
        if label == 0:
            for row in range(int(rng.integers(0, 3)), SIZE, 4):
                img[row, a:b] = 1
        elif label == 1:
            for col in range(int(rng.integers(0, 3)), SIZE, 4):
                img[a:b, col] = 1
        elif label == 2:
            idx = np.arange(a, b)
            img[idx, idx] = 1
            img[idx, a + b - 1 - idx] = 1
        else:
            img[a, a:b] = img[b - 1, a:b] = img[a:b, a] = img[a:b, b - 1] = 1
        images[i, 0] = img * rng.uniform(0.6, 1.4) + rng.normal(0, 0.25, img.shape)
    return images, labels


class ShapesNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        self.features = nn.Sequential(block(1, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2), block(32, 32))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, len(CLASSES))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train(steps: int, seed: int = SEED) -> tuple[ShapesNet, float]:
    """Adam on fresh synthetic batches; returns the model in eval mode and its held-out accuracy.

    One intra-op thread: the tensors are tiny, and more threads only contend (2× slower on a busy 2-core box).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, seed: int) -> tuple[ShapesNet, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ShapesNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(1, steps + 1):
        x, y = make_shapes(64, rng)
        loss = nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == steps:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    model.eval()
    x, y = make_shapes(500, np.random.default_rng(seed + 1))
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    return model, accuracy


def onnx_predictions(path: Path, images: NDArray[np.float32]) -> NDArray[np.int64]:
    """Class predictions of the converted model in ONNX Runtime, one image at a time (its batch is 1)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.array([int(np.argmax(sess.run(None, {name: img[None]})[0])) for img in images])


# -- serving ---------------------------------------------------------------------------------------------


def serve_and_query(model: Path, images: NDArray[np.float32], labels: NDArray[np.int64], port: int) -> int:
    """Start ``bnfold serve MODEL`` and send V2 inference requests; 0 when every answer matches ORT's."""
    try:
        import httpx  # noqa: PLC0415 - only this step needs it
    except ImportError:
        print("skipping the serving step: httpx is not installed (pip install httpx)")
        return 0
    command = bnfold_command()
    if command is None:
        print("skipping the serving step: `bnfold serve` is not available (install bnfold with its service)")
        return 0
    name = model.stem
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    args = [str(model), "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]  # REST only here
    print(f"$ bnfold serve {model} --host 127.0.0.1 --port {port}")
    try:
        server = launch(args, command=[*command, "serve"], port=port, timeout=60, log=model.with_suffix(".server.log"))
    except LaunchError as exc:
        print(f"the server did not become ready: {exc}")
        return 1
    try:
        expected = onnx_predictions(model, images)
        agree = 0
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for image, label, want in zip(images, labels, expected, strict=True):
                body = {
                    "inputs": [
                        {
                            "name": input_name,
                            "shape": [1, 1, SIZE, SIZE],
                            "datatype": "FP32",
                            "data": image.ravel().tolist(),
                        }
                    ]
                }
                response = client.post(f"/v2/models/{name}/infer", json=body)
                response.raise_for_status()
                scores = response.json()["outputs"][0]["data"]
                got = int(np.argmax(scores))
                agree += got == want
                print(f"  POST /v2/models/{name}/infer -> {CLASSES[got]:<10} (label {CLASSES[label]})")
        print(f"served answers equal to ONNX Runtime's: {agree}/{len(images)}")
        return 0 if agree == len(images) else 1
    finally:
        server.stop()


# -- the walk-through --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write shapes.pt/.onnx (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=120, help="training steps (default 120)")
    parser.add_argument("--port", type=int, help="port for bnfold serve (default: a free one)")
    parser.add_argument("--no-serve", action="store_true", help="stop after converting")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder and the server's log (default: removed)"
    )
    args = parser.parse_args(argv)
    with scratch.workdir(args.workdir, "bnfold-pytorch-", args.keep) as workdir:
        return walk_through(args, workdir)


def walk_through(args: argparse.Namespace, workdir: Path) -> int:

    print(f"1-2. training a small CNN with BatchNorm on synthetic shapes ({args.steps} steps)")
    tick = time.perf_counter()
    model, accuracy = train(args.steps)
    print(f"  held-out accuracy {accuracy:.1%} ({time.perf_counter() - tick:.1f}s)")

    pt, out, report = workdir / "shapes.pt", workdir / "shapes.onnx", workdir / "shapes.report.json"
    torch.jit.script(model).save(str(pt))
    print(f"3. saved TorchScript: {pt}")

    print(f"4. $ bnfold convert {pt} -o {out} --input-shape 1,1,{SIZE},{SIZE}")
    argv_convert = ["convert", str(pt), "-o", str(out), "--input-shape", f"1,1,{SIZE},{SIZE}", "--report", str(report)]
    code = converter_cli.main(argv_convert)
    if code != 0:
        return code
    folded = json.loads(report.read_text())
    print(f"  {len([r for r in folded['layers'] if r['action'] == 'folded'])} BatchNorms folded; report: {report}")

    images, labels = make_shapes(200, np.random.default_rng(SEED + 2))
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(images)).argmax(1).numpy()
    onnx_pred = onnx_predictions(out, images)
    same = int((torch_pred == onnx_pred).sum())
    accuracy = float((onnx_pred == labels).mean())
    print(f"  ONNX model vs PyTorch: same class for {same}/{len(images)} images; ONNX accuracy {accuracy:.1%}")
    if same != len(images):
        return 1

    if args.no_serve:
        return 0
    print("5. serving it")
    return serve_and_query(out, images[:8], labels[:8], args.port or free_port())


if __name__ == "__main__":
    sys.exit(main())
