"""BatchNorm written by hand in TensorFlow 2: batch moments, moving averages, an is_training switch.

    y = tf.nn.batch_normalization(x, mean, var, beta, gamma, eps)
    training:  mean, var = tf.nn.moments(x, axes)          (the batch's statistics)
               moving ← momentum·moving + (1 − momentum)·batch
    inference: mean, var = moving_mean, moving_var

:class:`ManualBNNet` is a small network built from it (no Keras): conv → BN → ReLU → conv → BN → ReLU → mean over
the image → dense → BN → dense. :func:`train` runs a few SGD steps on synthetic images (horizontal vs vertical
bars), :func:`save` writes a SavedModel whose ``serving_default`` signature is the inference branch
(``is_training=False``), which is what ``bnfold convert`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from numpy.typing import NDArray

SIZE = 12
CLASSES = ("horizontal", "vertical")


class ManualBatchNorm(tf.Module):
    """BatchNorm over every axis but the last (NHWC images or NC features), as hand-written TF 1.x-style code does."""

    def __init__(self, channels: int, momentum: float = 0.9, epsilon: float = 1e-3, name: str | None = None) -> None:
        super().__init__(name=name)
        self.gamma = tf.Variable(tf.ones([channels]), name="gamma")
        self.beta = tf.Variable(tf.zeros([channels]), name="beta")
        self.moving_mean = tf.Variable(tf.zeros([channels]), trainable=False, name="moving_mean")
        self.moving_variance = tf.Variable(tf.ones([channels]), trainable=False, name="moving_variance")
        self.momentum = momentum
        self.epsilon = epsilon

    def __call__(self, x: tf.Tensor, is_training: bool) -> tf.Tensor:
        if is_training:
            mean, variance = tf.nn.moments(x, axes=list(range(len(x.shape) - 1)))
            m = self.momentum
            self.moving_mean.assign(m * self.moving_mean + (1.0 - m) * mean)
            self.moving_variance.assign(m * self.moving_variance + (1.0 - m) * variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        return tf.nn.batch_normalization(x, mean, variance, self.beta, self.gamma, self.epsilon)


class ManualBNNet(tf.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(name="manual_bn_net")
        init = tf.random.stateless_normal
        self.w1 = tf.Variable(init([3, 3, 1, 8], seed=[seed, 1]) * 0.4, name="conv1")
        self.b1 = tf.Variable(tf.zeros([8]), name="conv1_bias")
        self.bn1 = ManualBatchNorm(8, name="bn1")
        self.w2 = tf.Variable(init([3, 3, 8, 16], seed=[seed, 2]) * 0.15, name="conv2")  # no bias
        self.bn2 = ManualBatchNorm(16, name="bn2")
        self.w3 = tf.Variable(init([16, 16], seed=[seed, 3]) * 0.25, name="dense1")
        self.b3 = tf.Variable(tf.zeros([16]), name="dense1_bias")
        self.bn3 = ManualBatchNorm(16, name="bn3")
        self.w4 = tf.Variable(init([16, len(CLASSES)], seed=[seed, 4]) * 0.25, name="dense2")
        self.b4 = tf.Variable(tf.zeros([len(CLASSES)]), name="dense2_bias")

    def __call__(self, x: tf.Tensor, is_training: bool = False) -> tf.Tensor:
        h = tf.nn.conv2d(x, self.w1, strides=1, padding="SAME") + self.b1
        h = tf.nn.relu(self.bn1(h, is_training))
        h = tf.nn.conv2d(h, self.w2, strides=2, padding="SAME")
        h = tf.nn.relu(self.bn2(h, is_training))
        h = tf.reduce_mean(h, axis=[1, 2])
        h = tf.nn.relu(self.bn3(tf.matmul(h, self.w3) + self.b3, is_training))
        return tf.matmul(h, self.w4) + self.b4

    @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32, name="image")])
    def serve(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"logits": self(image, is_training=False)}


def make_bars(n: int, rng: np.random.Generator) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """``n`` NHWC images (n, 12, 12, 1) of horizontal (0) or vertical (1) bars, noisy, and their labels."""
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 0.3, (n, SIZE, SIZE, 1)).astype(np.float32)
    for i, label in enumerate(labels):
        at = int(rng.integers(1, SIZE - 1))
        if label == 0:
            images[i, at, :, 0] += 1.0
        else:
            images[i, :, at, 0] += 1.0
    return images, labels


def train(steps: int, seed: int = 0) -> tuple[ManualBNNet, float]:
    """SGD with the BN in training mode (batch moments, moving averages updated); returns net and accuracy."""
    tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    net = ManualBNNet(seed)
    optimiser = tf.keras.optimizers.SGD(learning_rate=0.1)
    for _ in range(steps):
        x, y = make_bars(32, rng)
        with tf.GradientTape() as tape:
            logits = net(tf.constant(x), is_training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        grads = tape.gradient(loss, net.trainable_variables)
        optimiser.apply_gradients(zip(grads, net.trainable_variables, strict=True))
    x, y = make_bars(200, np.random.default_rng(seed + 1))
    accuracy = float((np.argmax(net(tf.constant(x)).numpy(), 1) == y).mean())
    return net, accuracy


def save(net: ManualBNNet, path: Path) -> None:
    tf.saved_model.save(net, str(path), signatures={"serving_default": net.serve})


def inference(net: ManualBNNet, images: NDArray[np.float32]) -> Any:
    return net(tf.constant(images), is_training=False).numpy()
