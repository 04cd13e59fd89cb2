"""--logits-chunk: the SDFT loss scored a few completion positions at a time under mx.checkpoint,
checked against its float64 twin (`reference.sdft_loss_chunked`) on values and gradients,
and against the unchunked trainer."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.core import losses
from mlx_sdft.core import reference

B, T, D, V, TAU = 3, 9, 8, 50, 0.7


def case(seed):
    rng = np.random.default_rng(seed)
    student_BTD = rng.standard_normal((B, T, D)).astype(np.float32)
    teacher_BTD = rng.standard_normal((B, T, D)).astype(np.float32)
    head_VD = rng.standard_normal((V, D)).astype(np.float32)
    mask_BT = (np.arange(T)[None, :] < np.array([T, 5, 0])[:, None]).astype(
        np.float32
    )  # full, padded, empty
    return student_BTD, teacher_BTD, head_VD, mask_BT


def opts(chunk, divergence="forward", skip=3, beta=0.5):
    return dict(chunk=chunk, divergence=divergence, skip=skip, beta=beta)


def chunked(student_BTD, teacher_BTD, head_VD, mask_BT, chunk, **kw):
    W = mx.array(head_VD)

    def loss_fn(h):
        return losses.sdft_loss_chunked(
            lambda x: (x @ W.T) / TAU,
            h,
            mx.array(teacher_BTD),
            mx.array(mask_BT),
            **opts(chunk, **kw),
        )

    h = mx.array(student_BTD)
    (loss, ntoks), grad = loss_fn(h), mx.grad(lambda h: loss_fn(h)[0])(h)
    mx.eval(loss, ntoks, grad)
    return loss.item(), ntoks.item(), np.array(grad)


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
@pytest.mark.parametrize("chunk", [1, 4, T, T + 3])
@pytest.mark.parametrize("skip", [0, 3])
def test_chunked_loss_matches_reference(divergence, chunk, skip):
    s, t, W, m = case(chunk + skip)
    loss, ntoks, grad = chunked(s, t, W, m, chunk, divergence=divergence, skip=skip)
    head = reference.LinearHead(W, TAU)
    ref_loss, ref_ntoks = reference.sdft_loss_chunked(
        head, s, t, m, **opts(chunk, divergence, skip)
    )
    ref_grad = reference.sdft_loss_chunked_grad(head, s, t, m, **opts(chunk, divergence, skip))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert ntoks == ref_ntoks
    # dL/dh sums V terms of dL/dlogits, so float32 cancellation shows at ~5e-6 of the largest entry.
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=2e-5 * np.abs(ref_grad).max())
    assert np.abs(grad[2]).max() == 0  # the empty sequence gets no gradient


def test_chunks_equal_the_whole_and_no_gradient_reaches_the_teacher():
    s, t, W, m = case(0)
    whole = chunked(s, t, W, m, T)
    for chunk in (1, 2, 5):
        loss, ntoks, grad = chunked(s, t, W, m, chunk)
        assert abs(loss - whole[0]) <= 1e-6 * abs(whole[0]) and ntoks == whole[1]
        np.testing.assert_allclose(grad, whole[2], rtol=1e-5, atol=1e-7)
    Wm = mx.array(W)
    teacher_grad = mx.grad(
        lambda th: losses.sdft_loss_chunked(
            lambda x: x @ Wm.T, mx.array(s), th, mx.array(m), **opts(4)
        )[0]
    )(mx.array(t))
    assert mx.abs(teacher_grad).max().item() == 0
