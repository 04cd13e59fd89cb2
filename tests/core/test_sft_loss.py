"""The SFT baseline's cross-entropy against its numpy twin: a hand case, values and gradients."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.core import losses
from mlx_sdft.core import reference


def test_hand_case():
    # Two tokens of one sequence: p(target) = 0.5 and 0.25 → loss = (ln 2 + ln 4) / 2.
    logits = np.log(np.array([[[0.5, 0.5, 1e-30], [0.25, 0.5, 0.25]]]))
    targets, mask = np.array([[0, 2]]), np.array([[1, 1]])
    want = (math.log(2) + math.log(4)) / 2
    assert reference.sft_loss(logits, targets, mask) == (pytest.approx(want, rel=1e-12), 2)
    loss, ntoks = losses.sft_loss(
        mx.array(logits, dtype=mx.float32), mx.array(targets), mx.array(mask)
    )
    assert loss.item() == pytest.approx(want, rel=1e-6) and ntoks.item() == 2


@pytest.mark.parametrize("V", [7, 1000])
def test_values_and_gradients_match_reference(V):
    rng = np.random.default_rng(V)
    logits = rng.normal(size=(3, 6, V)) * 3
    targets = rng.integers(0, V, size=(3, 6))
    mask = (np.arange(6)[None] < np.array([[6], [2], [0]])).astype(np.float32)
    want, n = reference.sft_loss(logits, targets, mask)
    grad_fn = mx.value_and_grad(lambda z: losses.sft_loss(z, mx.array(targets), mx.array(mask))[0])
    loss, grad = grad_fn(mx.array(logits, dtype=mx.float32))
    assert loss.item() == pytest.approx(want, rel=1e-5) and n == 8
    np.testing.assert_allclose(
        np.array(grad), reference.sft_loss_grad(logits, targets, mask), rtol=1e-4, atol=1e-7
    )


def test_reference_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    logits, targets, mask = (
        rng.normal(size=(2, 3, 5)),
        rng.integers(0, 5, size=(2, 3)),
        np.array([[1, 1, 0], [1, 0, 0]]),
    )
    grad, eps = reference.sft_loss_grad(logits, targets, mask), 1e-6
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += eps
        down[idx] -= eps
        fd = (
            reference.sft_loss(up, targets, mask)[0] - reference.sft_loss(down, targets, mask)[0]
        ) / (2 * eps)
        assert fd == pytest.approx(grad[idx], abs=1e-7)


def test_all_masked_is_finite_zero():
    loss, ntoks = losses.sft_loss(
        mx.zeros((1, 2, 4)), mx.zeros((1, 2), dtype=mx.int32), mx.zeros((1, 2))
    )
    assert loss.item() == 0.0 and ntoks.item() == 0
