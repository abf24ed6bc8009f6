"""Keras models that carry BatchNorm after each kind of layer, with trained-like BN statistics.

Used by tests/tensorflow and benchmarks/tf_coverage.py. Each case is ``(input shape without batch, layers)``;
:func:`build` makes the Sequential model and gives every BatchNormalization random γ, β, moving mean and
moving variance (a fresh layer has 1, 0, 0, 1, which would hide a wrong fold).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np

L = keras.layers

CASES: dict[str, Callable[[], tuple[tuple[int, ...], list[Any]]]] = {
    "Conv2D": lambda: ((8, 8, 3), [L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU()]),
    "Conv2D use_bias=False": lambda: ((8, 8, 3), [L.Conv2D(4, 3, use_bias=False), L.BatchNormalization()]),
    "Conv1D": lambda: ((10, 3), [L.Conv1D(4, 3), L.BatchNormalization()]),
    "Conv3D": lambda: ((5, 5, 5, 2), [L.Conv3D(4, 3, use_bias=False), L.BatchNormalization()]),
    "DepthwiseConv2D": lambda: ((8, 8, 3), [L.DepthwiseConv2D(3, depth_multiplier=2), L.BatchNormalization()]),
    "SeparableConv2D": lambda: ((8, 8, 3), [L.SeparableConv2D(4, 3, use_bias=False), L.BatchNormalization()]),
    "Conv2DTranspose": lambda: ((6, 6, 3), [L.Conv2DTranspose(4, 3, strides=2), L.BatchNormalization()]),
    "Dense": lambda: ((6,), [L.Dense(5), L.BatchNormalization(), L.Dense(3, use_bias=False), L.BatchNormalization()]),
    "BN center/scale off": lambda: (
        (8, 8, 3),
        [L.Conv2D(4, 3), L.BatchNormalization(center=False, scale=False), L.Flatten(), L.Dense(3)],
    ),
    "Conv2D channels_first": lambda: (
        (3, 8, 8),
        [L.Conv2D(4, 3, data_format="channels_first"), L.BatchNormalization(axis=1)],
    ),
    "Conv1D channels_first": lambda: (
        (3, 10),
        [L.Conv1D(4, 3, data_format="channels_first", use_bias=False), L.BatchNormalization(axis=1)],
    ),
}


def randomise_batchnorms(model: Any, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = int(layer.moving_mean.shape[0])
            values = []
            if layer.scale:
                values.append(rng.uniform(0.5, 2.0, n))
            if layer.center:
                values.append(rng.normal(size=n))
            values += [rng.normal(size=n), rng.uniform(0.5, 2.0, n)]
            layer.set_weights(values)


def build(name: str, seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    shape, layers = CASES[name]()
    model = keras.Sequential([keras.Input(shape), *layers])
    randomise_batchnorms(model, np.random.default_rng(seed))
    return model


def fine_tuned(seed: int = 0, steps: int = 2) -> tuple[Any, list[Any]]:
    """A conv base with a frozen BatchNorm under a trainable Dense+BN head, fitted ``steps`` batches.

    Returns the model and the frozen BN's moving statistics before fitting (they must not move).
    """
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3), L.BatchNormalization(), L.ReLU()])
    randomise_batchnorms(base, np.random.default_rng(seed))
    base.trainable = False
    model = keras.Sequential([base, L.Flatten(), L.Dense(6), L.BatchNormalization(), L.Dense(2)])
    frozen = [w.copy() for w in base.layers[1].get_weights()]
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16 * steps, 8, 8, 3)).astype(np.float32)
    y = rng.integers(0, 2, 16 * steps)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    return model, frozen


class FusedBatchNormNet:
    """Conv2D → ``FusedBatchNormV3`` (the op TF-Keras 2 and ``tf.compat.v1.layers`` emit; ONNX BatchNormalization
    after export) → ReLU, as a tf.Module called like the hand-written BN network: ``net(x, is_training=False)``."""

    def __init__(self, seed: int = 0) -> None:
        import tensorflow as tf  # noqa: PLC0415 - with keras already imported, this is cheap

        rng = np.random.default_rng(seed)
        self.module = tf.Module()
        self.w = tf.Variable(rng.standard_normal((3, 3, 3, 4)).astype(np.float32))
        self.gamma = tf.Variable(rng.uniform(0.5, 2, 4).astype(np.float32))
        self.beta = tf.Variable(rng.standard_normal(4).astype(np.float32))
        self.mean = tf.Variable(rng.standard_normal(4).astype(np.float32))
        self.var = tf.Variable(rng.uniform(0.5, 2, 4).astype(np.float32))
        self.tf = tf

    def __call__(self, x: Any, is_training: bool = False) -> Any:
        tf = self.tf
        h = tf.nn.conv2d(x, self.w, 1, "SAME")
        y = tf.raw_ops.FusedBatchNormV3(
            x=h,
            scale=self.gamma,
            offset=self.beta,
            mean=self.mean,
            variance=self.var,
            epsilon=1e-3,
            is_training=is_training,
        )[0]
        return tf.nn.relu(y)

    def save(self, path: str) -> None:
        tf = self.tf
        module = tf.Module()
        module.variables_ = [self.w, self.gamma, self.beta, self.mean, self.var]
        serve = tf.function(
            lambda x: {"y": self(x, is_training=False)},
            input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="x")],
        )
        module.serve = serve
        tf.saved_model.save(module, path, signatures={"serving_default": serve})
