"""The numpy oracle itself: it must state BatchNorm's definition exactly, or every other test proves nothing."""

from __future__ import annotations

import numpy as np
import pytest

from converter import reference as ref


def test_train_step_normalises_with_batch_statistics() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (16, 4, 5, 5))
    p = ref.BatchNormParams.initial(4)
    y, _, _ = ref.train_step(x, p)
    assert np.allclose(y.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    # biased batch variance: σ²/(σ²+ε) after normalisation
    var = x.var(axis=(0, 2, 3))
    assert np.allclose(y.var(axis=(0, 2, 3)), var / (var + p.eps), rtol=1e-12)


def test_train_step_scales_shifts_and_updates_running_stats_with_momentum() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0.0, 1.0, (8, 3))  # (N, C): BatchNorm1d
    p = ref.BatchNormParams(
        gamma=np.array([2.0, 0.5, 1.0]),
        beta=np.array([1.0, -1.0, 0.0]),
        running_mean=np.array([0.1, 0.2, 0.3]),
        running_var=np.array([1.0, 2.0, 3.0]),
        momentum=0.9,
    )
    y, new, _ = ref.train_step(x, p)
    mu, var = x.mean(axis=0), x.var(axis=0)
    assert np.allclose(y, p.gamma * (x - mu) / np.sqrt(var + p.eps) + p.beta)
    assert np.allclose(new.running_mean, 0.9 * p.running_mean + 0.1 * mu)
    assert np.allclose(new.running_var, 0.9 * p.running_var + 0.1 * var)
    assert new.gamma is p.gamma and new.beta is p.beta


def test_running_stats_converge_to_the_data_statistics() -> None:
    rng = np.random.default_rng(2)
    p = ref.BatchNormParams.initial(2, momentum=0.9)
    for _ in range(300):
        _, p, _ = ref.train_step(rng.normal([[5.0], [-2.0]], [[3.0], [0.5]], (2, 256)).T, p)
    assert np.allclose(p.running_mean, [5.0, -2.0], atol=0.15)
    assert np.allclose(p.running_var, [9.0, 0.25], rtol=0.1)


def test_test_step_uses_running_statistics_and_equals_the_affine_form() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 3, 3))
    p = ref.BatchNormParams(
        gamma=rng.uniform(0.5, 1.5, 5),
        beta=rng.normal(size=5),
        running_mean=rng.normal(size=5),
        running_var=rng.uniform(0.1, 2.0, 5),
        eps=1e-3,
    )
    c = (1, 5, 1, 1)
    expected = p.gamma.reshape(c) * (x - p.running_mean.reshape(c)) / np.sqrt(p.running_var.reshape(c) + p.eps)
    expected += p.beta.reshape(c)
    assert np.allclose(ref.test_step(x, p), expected, rtol=1e-14)
    s, t = ref.affine(p)
    assert np.allclose(s.reshape(c) * x + t.reshape(c), expected, rtol=1e-12, atol=1e-14)


def test_backward_matches_numerical_gradient() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 3, 2))
    p = ref.BatchNormParams(
        gamma=rng.uniform(0.5, 1.5, 3), beta=rng.normal(size=3), running_mean=np.zeros(3), running_var=np.ones(3)
    )
    w = rng.normal(size=x.shape)  # loss = sum(w * y)
    _, _, cache = ref.train_step(x, p)
    dx, dgamma, dbeta = ref.train_backward(w, cache)

    def loss(xv: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> float:
        q = ref.BatchNormParams(gamma=gamma, beta=beta, running_mean=p.running_mean, running_var=p.running_var)
        return float(np.sum(w * ref.train_step(xv, q)[0]))

    h = 1e-6
    num_dx = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = h
        num_dx[i] = (loss(x + e, p.gamma, p.beta) - loss(x - e, p.gamma, p.beta)) / (2 * h)
    num_dg = np.array(
        [
            (loss(x, p.gamma + h * np.eye(3)[c], p.beta) - loss(x, p.gamma - h * np.eye(3)[c], p.beta)) / (2 * h)
            for c in range(3)
        ]
    )
    assert np.allclose(dx, num_dx, atol=1e-6)
    assert np.allclose(dgamma, num_dg, atol=1e-6)
    assert np.allclose(dbeta, w.sum(axis=(0, 2)))


def test_rejects_inputs_without_a_channel_axis() -> None:
    with pytest.raises(ValueError, match="N, C"):
        ref.test_step(np.zeros(3), ref.BatchNormParams.initial(3))
