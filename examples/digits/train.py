"""Train the bundled ``digits`` model in numpy and write it as ONNX (the "before" model, BatchNorm explicit).

    python -m examples.digits.train            # writes service/models/digits/1/model.onnx

Seeded and reproducible: one ``np.random.default_rng(seed)`` draws the initial weights and every epoch's
shuffle. Adam with a cosine learning-rate decay, mini-batches of 32 (the last partial batch of an epoch is
dropped so that no BatchNorm sees a tiny batch), softmax cross-entropy. BLAS runs on one thread: the matrices
are small, and on a busy machine OpenBLAS's extra threads spin instead of helping (same result either way).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from examples.digits.data import load_split
from examples.digits.export import correct, run_onnx, to_onnx
from examples.digits.model import Array, Params, backward, forward, forward_train, init_params, softmax_cross_entropy

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "service" / "models" / "digits" / "1" / "model.onnx"
SEED = 0
EPOCHS = 20


@dataclass(frozen=True)
class Hyper:
    epochs: int = EPOCHS
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4  # L2 on the conv/linear weights only (not on γ, β or the output bias)
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8


DECAYED = ("conv1", "conv2", "fc1", "fc2")


def train(
    x: NDArray[np.float64],
    y: NDArray[np.int64],
    seed: int = SEED,
    hyper: Hyper | None = None,
    log: bool = False,
) -> Params:
    """Train from scratch; the same inputs and seed give bit-identical parameters."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _train(x, y, seed, hyper or Hyper(), log)


def _train(x: NDArray[np.float64], y: NDArray[np.int64], seed: int, hp: Hyper, log: bool) -> Params:
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.trainable().items()}
    v = {k: np.zeros_like(a) for k, a in p.trainable().items()}
    steps_per_epoch = len(x) // hp.batch_size
    total = hp.epochs * steps_per_epoch
    t = 0
    for epoch in range(hp.epochs):
        order = rng.permutation(len(x))
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * hp.batch_size : (b + 1) * hp.batch_size]
            logits, p, cache = forward_train(p, x[idx])
            loss, dlogits = softmax_cross_entropy(logits, y[idx])
            losses.append(loss)
            grads = backward(p, cache, dlogits)
            lr = 0.5 * hp.lr * (1.0 + np.cos(np.pi * t / total))
            t += 1
            values: dict[str, Array] = {}
            for k, w in p.trainable().items():
                g = grads[k] + hp.weight_decay * w if k in DECAYED else grads[k]
                m[k] = hp.beta1 * m[k] + (1 - hp.beta1) * g
                v[k] = hp.beta2 * v[k] + (1 - hp.beta2) * g * g
                m_hat = m[k] / (1 - hp.beta1**t)
                v_hat = v[k] / (1 - hp.beta2**t)
                values[k] = w - lr * m_hat / (np.sqrt(v_hat) + hp.adam_eps)
            p = p.with_trainable(values)
        if log:
            print(f"epoch {epoch + 1:3d}/{hp.epochs}  loss {np.mean(losses):.4f}")
    return p


def save_atomically(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shipped model must be readable by the service user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.digits.train", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-epoch loss")
    args = parser.parse_args(argv)

    split = load_split()
    start = time.perf_counter()
    params = train(split.x_train, split.y_train, args.seed, Hyper(epochs=args.epochs), log=not args.quiet)
    seconds = time.perf_counter() - start
    n = len(split.y_test)
    numpy_ok = correct(forward(params, split.x_test), split.y_test)
    model = to_onnx(params)
    onnx_ok = correct(run_onnx(model, split.x_test), split.y_test)
    save_atomically(model, args.out)
    print(f"trained {args.epochs} epochs in {seconds:.1f} s (seed {args.seed})")
    print(f"held-out accuracy (numpy, float64):       {100 * numpy_ok / n:.2f}% ({numpy_ok}/{n})")
    print(f"held-out accuracy (ONNX Runtime, float32): {100 * onnx_ok / n:.2f}% ({onnx_ok}/{n})")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
