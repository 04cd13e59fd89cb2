"""The SDFT loss: MLX vs the float64 reference (values, gradients), hand-computed numbers, properties.

Run: pytest -q tests/core/test_losses.py
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.core import losses
from mlx_sdft.core import reference

DIVERGENCES = losses.DIVERGENCES
# MLX parity runs on every device this machine has: the CPU always, the GPU where Metal or CUDA exists.
DEVICES = [mx.cpu] + ([mx.gpu] if mx.metal.is_available() or mx.cuda.is_available() else [])
device_param = pytest.mark.parametrize("device", DEVICES, ids=lambda d: str(d))


def random_case(seed, B=3, T=9, V=7, scale=1.0):
    """float32 student/teacher logits and a 0/1 mask of variable lengths (one sequence may be empty)."""
    rng = np.random.default_rng(seed)
    student_BTV = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    teacher_BTV = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    lengths_B = rng.integers(0, T + 1, size=B)
    lengths_B[0] = T  # at least one full-length sequence
    mask_BT = (np.arange(T)[None, :] < lengths_B[:, None]).astype(np.float32)
    return student_BTV, teacher_BTV, mask_BT


def opts(divergence="forward", skip=3, beta=0.5):
    """The loss options of a case: the losses take them keyword-only, without defaults."""
    return dict(divergence=divergence, skip=skip, beta=beta)


def div_opts(divergence="forward", beta=0.5):
    return dict(divergence=divergence, beta=beta)


def mlx_loss_and_grad(student_BTV, teacher_BTV, mask_BT, **kwargs):
    """(loss, ntoks, grad wrt student logits) from the MLX implementation; kwargs as for `opts`."""
    kwargs = opts(**kwargs)

    def loss_fn(s):
        return losses.sdft_loss(s, mx.array(teacher_BTV), mx.array(mask_BT), **kwargs)[0]

    s = mx.array(student_BTV)
    loss, ntoks = losses.sdft_loss(s, mx.array(teacher_BTV), mx.array(mask_BT), **kwargs)
    grad_BTV = mx.grad(loss_fn)(s)
    mx.eval(loss, ntoks, grad_BTV)
    return loss.item(), ntoks.item(), np.array(grad_BTV.astype(mx.float32))


# --- MLX float32 vs numpy float64 ------------------------------------------------------------


@device_param
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("V", [7, 1000])
@pytest.mark.parametrize("skip", [0, 3])
def test_values_match_reference(device, divergence, scale, V, skip):
    student_BTV, teacher_BTV, mask_BT = random_case(V + skip, V=V, scale=scale)
    with mx.stream(device):
        div_BT = losses.token_divergence(
            mx.array(student_BTV), mx.array(teacher_BTV), **div_opts(divergence)
        )
        loss, ntoks = losses.sdft_loss(
            mx.array(student_BTV),
            mx.array(teacher_BTV),
            mx.array(mask_BT),
            **opts(divergence, skip),
        )
        mx.eval(div_BT, loss, ntoks)
    ref_loss, ref_ntoks = reference.sdft_loss(
        student_BTV, teacher_BTV, mask_BT, **opts(divergence, skip)
    )
    ref_div_BT = reference.token_divergence(student_BTV, teacher_BTV, **div_opts(divergence))
    np.testing.assert_allclose(np.array(div_BT), ref_div_BT, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-5)
    assert ntoks.item() == ref_ntoks


@device_param
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("V", [7, 1000])
def test_gradients_match_reference(device, divergence, scale, V):
    student_BTV, teacher_BTV, mask_BT = random_case(2 * V, V=V, scale=scale)
    with mx.stream(device):
        _, _, grad_BTV = mlx_loss_and_grad(student_BTV, teacher_BTV, mask_BT, divergence=divergence)
    ref_grad_BTV = reference.sdft_loss_grad(student_BTV, teacher_BTV, mask_BT, **opts(divergence))
    # jsd saturates near H(beta) when p and q barely overlap (×10 logits): its gradient is then a
    # small difference of O(p) terms, so float32 keeps ~5e-5 of the largest entry, not 1e-6.
    atol = (1e-4 if divergence == "jsd" else 1e-6) * np.abs(ref_grad_BTV).max()
    np.testing.assert_allclose(grad_BTV, ref_grad_BTV, rtol=1e-4, atol=atol)


@device_param
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bfloat16_inputs(device, divergence):
    """bf16 logits are upcast before any math, so the reference sees the same bf16-rounded numbers."""
    student_BTV, teacher_BTV, mask_BT = random_case(5, V=1000, scale=3.0)
    s16, t16 = mx.array(student_BTV).astype(mx.bfloat16), mx.array(teacher_BTV).astype(mx.bfloat16)
    s_rounded, t_rounded = np.array(s16.astype(mx.float32)), np.array(t16.astype(mx.float32))
    with mx.stream(device):
        loss, _ = losses.sdft_loss(s16, t16, mx.array(mask_BT), **opts(divergence))
        grad_BTV = mx.grad(
            lambda s: losses.sdft_loss(s, t16, mx.array(mask_BT), **opts(divergence))[0]
        )(s16)
        mx.eval(loss, grad_BTV)
    assert loss.dtype == mx.float32 and grad_BTV.dtype == mx.bfloat16
    np.testing.assert_allclose(
        loss.item(),
        reference.sdft_loss(s_rounded, t_rounded, mask_BT, **opts(divergence))[0],
        rtol=2e-2,
    )
    ref_grad_BTV = reference.sdft_loss_grad(s_rounded, t_rounded, mask_BT, **opts(divergence))
    # The gradient itself is rounded to bf16 (8 bits of mantissa) on the way out.
    np.testing.assert_allclose(
        np.array(grad_BTV.astype(mx.float32)),
        ref_grad_BTV,
        rtol=2e-2,
        atol=1e-3 * np.abs(ref_grad_BTV).max(),
    )


@device_param
def test_near_equal_distributions_large_vocab(device):
    """The realistic regime (teacher ≈ student) at SmolLM2's vocabulary. Plain float32 sums over
    49152 entries give ~1e-5 error per token and ~3e-4 (of the largest entry) in the gradient."""
    student_BTV, _, mask_BT = random_case(0, B=2, T=8, V=49152, scale=3.0)
    noise_BTV = 0.03 * np.random.default_rng(0).standard_normal(student_BTV.shape)
    teacher_BTV = (student_BTV + noise_BTV).astype(np.float32)
    with mx.stream(device):
        div_BT = losses.token_divergence(mx.array(student_BTV), mx.array(teacher_BTV), **div_opts())
        _, _, grad_BTV = mlx_loss_and_grad(student_BTV, teacher_BTV, mask_BT, skip=0)
    np.testing.assert_allclose(
        np.array(div_BT),
        reference.token_divergence(student_BTV, teacher_BTV, **div_opts()),
        rtol=0,
        atol=3e-6,
    )
    ref_grad_BTV = reference.sdft_loss_grad(student_BTV, teacher_BTV, mask_BT, **opts(skip=0))
    assert np.abs(grad_BTV - ref_grad_BTV).max() <= 5e-5 * np.abs(ref_grad_BTV).max()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_reference_gradient_matches_finite_differences(divergence, beta):
    student_BTV, teacher_BTV, mask_BT = random_case(11, B=2, T=5, V=5, scale=2.0)
    student_BTV = student_BTV.astype(np.float64)
    mask_BT[1, 3:] = 0.0
    kwargs = dict(divergence=divergence, skip=1, beta=beta)
    eps = 1e-6
    fd_BTV = np.zeros_like(student_BTV)
    for idx in np.ndindex(student_BTV.shape):
        plus, minus = student_BTV.copy(), student_BTV.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd_BTV[idx] = (
            reference.sdft_loss(plus, teacher_BTV, mask_BT, **kwargs)[0]
            - reference.sdft_loss(minus, teacher_BTV, mask_BT, **kwargs)[0]
        ) / (2 * eps)
    grad_BTV = reference.sdft_loss_grad(student_BTV, teacher_BTV, mask_BT, **kwargs)
    np.testing.assert_allclose(grad_BTV, fd_BTV, rtol=1e-6, atol=1e-9)


@device_param
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_no_gradient_reaches_the_teacher(device, divergence):
    student_BTV, teacher_BTV, mask_BT = random_case(3, V=50)
    with mx.stream(device):
        grad_BTV = mx.grad(
            lambda t: losses.sdft_loss(
                mx.array(student_BTV), t, mx.array(mask_BT), **opts(divergence)
            )[0]
        )(mx.array(teacher_BTV))
        mx.eval(grad_BTV)
    assert np.all(np.array(grad_BTV) == 0.0)


# --- Hand-computed numbers (docs/method.md, "Divergences") ------------------------------------

GOLDEN = {"forward": 0.2231436, "reverse": 0.1927448, "jsd": 0.0506718}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_golden_two_token_case(divergence):
    """p = [0.8, 0.2] (student), q = [0.5, 0.5] (teacher); KL(q‖p) ≠ KL(p‖q)."""
    student_BTV = np.log(np.array([[[0.8, 0.2]]], dtype=np.float32))
    teacher_BTV = np.log(np.array([[[0.5, 0.5]]], dtype=np.float32))
    mask_BT = np.ones((1, 1), dtype=np.float32)
    loss, ntoks = losses.sdft_loss(
        mx.array(student_BTV), mx.array(teacher_BTV), mx.array(mask_BT), **opts(divergence, 0)
    )
    ref_loss, ref_ntoks = reference.sdft_loss(
        student_BTV, teacher_BTV, mask_BT, **opts(divergence, 0)
    )
    assert abs(loss.item() - GOLDEN[divergence]) < 1e-6
    assert abs(ref_loss - GOLDEN[divergence]) < 1e-6
    assert ntoks.item() == ref_ntoks == 1
    assert abs(GOLDEN["forward"] - GOLDEN["reverse"]) > 1e-2


# --- Properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_when_student_equals_teacher(divergence):
    logits_BTV, _, mask_BT = random_case(1, V=100, scale=5.0)
    loss, _, grad_BTV = mlx_loss_and_grad(
        logits_BTV, logits_BTV, mask_BT, divergence=divergence, skip=0
    )
    assert abs(loss) < 1e-6
    assert np.abs(grad_BTV).max() < 1e-7


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_non_negative(divergence):
    student_BTV, teacher_BTV, _ = random_case(2, B=4, T=16, V=30, scale=3.0)
    div_BT = losses.token_divergence(
        mx.array(student_BTV), mx.array(teacher_BTV), **div_opts(divergence)
    )
    assert np.all(np.array(div_BT) >= 0.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_positions_change_nothing(divergence):
    """Logits at padding (mask 0) and at the first `skip` positions affect neither loss nor gradients."""
    student_BTV, teacher_BTV, mask_BT = random_case(4, B=3, T=10, V=20)
    mask_BT[1, 6:] = 0.0
    ignored_BT = (mask_BT == 0) | (np.arange(10) < 3)[None, :]
    rng = np.random.default_rng(0)
    student2_BTV, teacher2_BTV = student_BTV.copy(), teacher_BTV.copy()
    student2_BTV[ignored_BT] = 10.0 * rng.standard_normal((ignored_BT.sum(), 20))
    teacher2_BTV[ignored_BT] = 10.0 * rng.standard_normal((ignored_BT.sum(), 20))
    loss, ntoks, grad_BTV = mlx_loss_and_grad(
        student_BTV, teacher_BTV, mask_BT, divergence=divergence, skip=3
    )
    loss2, ntoks2, grad2_BTV = mlx_loss_and_grad(
        student2_BTV, teacher2_BTV, mask_BT, divergence=divergence, skip=3
    )
    assert loss == loss2 and ntoks == ntoks2 == int((~ignored_BT).sum())
    np.testing.assert_array_equal(grad_BTV, grad2_BTV)
    assert np.all(grad_BTV[ignored_BT] == 0.0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("how", ["mask", "skip"])
def test_all_masked_batch_is_finite_zero(divergence, how):
    student_BTV, teacher_BTV, _ = random_case(6, B=2, T=3, V=10)
    mask_BT = np.zeros((2, 3), np.float32) if how == "mask" else np.ones((2, 3), np.float32)
    loss, ntoks, grad_BTV = mlx_loss_and_grad(
        student_BTV, teacher_BTV, mask_BT, divergence=divergence, skip=3
    )
    assert loss == 0.0 and ntoks == 0
    assert np.all(grad_BTV == 0.0)
    assert reference.sdft_loss(student_BTV, teacher_BTV, mask_BT, **opts(divergence, 3)) == (0.0, 0)


def test_loss_is_mean_of_per_sequence_means():
    """One 8-token and one 2-token sequence count equally: not a token-mean over the batch."""
    student_BTV, teacher_BTV, _ = random_case(7, B=2, T=8, V=10, scale=2.0)
    mask_BT = np.zeros((2, 8), np.float32)
    mask_BT[0, :] = 1.0
    mask_BT[1, :2] = 1.0
    div_BT = np.array(
        losses.token_divergence(mx.array(student_BTV), mx.array(teacher_BTV), **div_opts())
    )
    loss, ntoks = losses.sdft_loss(
        mx.array(student_BTV), mx.array(teacher_BTV), mx.array(mask_BT), **opts(skip=0)
    )
    mean_of_means = (div_BT[0].mean() + div_BT[1, :2].mean()) / 2
    token_mean = (div_BT * mask_BT).sum() / mask_BT.sum()
    np.testing.assert_allclose(loss.item(), mean_of_means, rtol=1e-6)
    assert abs(loss.item() - token_mean) > 1e-3
    assert ntoks.item() == 10


def test_loss_mask_drops_first_skip_positions():
    mask_BT = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], np.float32)
    expected_BT = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(np.array(losses.loss_mask(mx.array(mask_BT), 3)), expected_BT)
    np.testing.assert_array_equal(reference.loss_mask(mask_BT, 3), expected_BT)
    np.testing.assert_array_equal(
        np.array(losses.loss_mask(mx.array(mask_BT).astype(mx.bool_), 0)), mask_BT
    )


@pytest.mark.parametrize("module", [losses, reference], ids=["mlx", "reference"])
@pytest.mark.parametrize("divergence,beta", [("kl", 0.5), ("jsd", 0.0), ("jsd", 1.0), ("jsd", 1.5)])
def test_bad_options_raise(module, divergence, beta):
    student_BTV, teacher_BTV, mask_BT = random_case(8, V=5)
    as_array = mx.array if module is losses else np.asarray
    with pytest.raises(ValueError):
        module.sdft_loss(
            as_array(student_BTV),
            as_array(teacher_BTV),
            as_array(mask_BT),
            **opts(divergence, beta=beta),
        )


# --- top-K teacher support with a tail bucket (--topk) -------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("k", [1, 3, 20])
def test_topk_values_and_gradients_match_reference(divergence, k):
    rng = np.random.default_rng(k)
    student, teacher = rng.normal(size=(3, 6, 40)) * 2, rng.normal(size=(3, 6, 40)) * 2
    mask = (np.arange(6)[None] < np.array([[6], [4], [1]])).astype(np.float32)
    idx, buckets = reference.teacher_topk(teacher, k)  # both sides get the same teacher buckets
    want, n = reference.sdft_loss_topk(student, idx, buckets, mask, **opts(divergence, 1))

    def loss_fn(z):
        return losses.sdft_loss_topk(
            z,
            mx.array(idx),
            mx.array(buckets, dtype=mx.float32),
            mx.array(mask),
            **opts(divergence, 1),
        )[0]

    loss, grad = mx.value_and_grad(loss_fn)(mx.array(student, dtype=mx.float32))
    assert loss.item() == pytest.approx(want, rel=1e-5) and n == 8
    # gradient by float64 central differences of the numpy twin, on a few coordinates
    for b, t, v in [(0, 2, 5), (1, 3, int(np.argmax(teacher[1, 3]))), (0, 5, 39)]:
        up, down = student.copy(), student.copy()
        up[b, t, v] += 1e-5
        down[b, t, v] -= 1e-5
        fd = (
            reference.sdft_loss_topk(up, idx, buckets, mask, **opts(divergence, 1))[0]
            - reference.sdft_loss_topk(down, idx, buckets, mask, **opts(divergence, 1))[0]
        ) / 2e-5
        assert grad[b, t, v].item() == pytest.approx(fd, abs=2e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_the_whole_vocabulary_is_the_full_loss(divergence):
    rng = np.random.default_rng(1)
    student, teacher, mask = (
        rng.normal(size=(2, 4, 12)),
        rng.normal(size=(2, 4, 12)),
        np.ones((2, 4)),
    )
    idx, buckets = losses.teacher_topk(mx.array(teacher, dtype=mx.float32), 12)
    got = losses.sdft_loss_topk(
        mx.array(student, dtype=mx.float32), idx, buckets, mx.array(mask), **opts(divergence, 0)
    )[0]
    assert got.item() == pytest.approx(
        reference.sdft_loss(student, teacher, mask, **opts(divergence, 0))[0], rel=1e-5
    )
    ref_idx, ref_buckets = reference.teacher_topk(
        teacher, 12
    )  # the twin too, with its -inf empty tail
    ref = reference.sdft_loss_topk(student, ref_idx, ref_buckets, mask, **opts(divergence, 0))[0]
    assert ref == pytest.approx(
        reference.sdft_loss(student, teacher, mask, **opts(divergence, 0))[0], rel=1e-9
    )


def test_topk_tail_bucket_hand_case():
    # Teacher q = [0.2, 0.6, 0.2] keeps token 1 (K=1); tail buckets: q_tail = 0.4, p_tail = 0.7 for
    # p = [0.5, 0.3, 0.2]. KL = 0.6·ln(0.6/0.3) + 0.4·ln(0.4/0.7) = 0.1920419.
    p, q = np.log([[[0.5, 0.3, 0.2]]]), np.log([[[0.2, 0.6, 0.2]]])
    want = 0.6 * np.log(2.0) + 0.4 * np.log(0.4 / 0.7)
    idx, buckets = losses.teacher_topk(mx.array(q, dtype=mx.float32), 1)
    got = losses.sdft_loss_topk(
        mx.array(p, dtype=mx.float32), idx, buckets, mx.ones((1, 1)), **opts(skip=0)
    )[0]
    assert got.item() == pytest.approx(want, rel=1e-5)
    ref_idx, ref_buckets = reference.teacher_topk(q, 1)
    assert reference.sdft_loss_topk(p, ref_idx, ref_buckets, np.ones((1, 1)), **opts(skip=0))[
        0
    ] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_teacher_topk_matches_reference(k):
    """The same K tokens (MLX's argpartition leaves them unordered) with the same bucket log-probabilities."""
    teacher = np.random.default_rng(k).normal(size=(2, 5, 40)) * 2
    idx, buckets = losses.teacher_topk(mx.array(teacher, dtype=mx.float32), k)
    ref_idx, ref_buckets = reference.teacher_topk(teacher, k)
    order, ref_order = np.argsort(np.array(idx), axis=-1), np.argsort(ref_idx, axis=-1)
    np.testing.assert_array_equal(
        np.take_along_axis(np.array(idx), order, -1), np.take_along_axis(ref_idx, ref_order, -1)
    )
    np.testing.assert_allclose(
        np.take_along_axis(np.array(buckets)[..., :k], order, -1),
        np.take_along_axis(ref_buckets[..., :k], ref_order, -1),
        rtol=1e-5,
        atol=1e-6,
    )
    tail = np.array(buckets)[..., k]
    np.testing.assert_allclose(tail, np.maximum(ref_buckets[..., k], -1e9), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["kl", "jsd"])
def test_closed_form_ops_values_and_both_gradients_match_finite_differences(op):
    """kl_of_logits(p, q) = KL(p‖q) and jsd_of_logits(p, q, 0.3) against the float64 reference,
    and their gradients with respect to each argument against central differences of that
    reference (the trainer differentiates only the student's side; the other must be right too)."""
    rng = np.random.default_rng(7)
    p_logits, q_logits = rng.standard_normal((2, 3, 7)) * 2, rng.standard_normal((2, 3, 7)) * 2
    weights = rng.standard_normal((2, 3))  # a random cotangent for the per-token divergence

    def ref(p, q):  # the twins: KL(first‖second); jsd weighs the second (the teacher) by beta
        div = reference.kl_of_logits(p, q) if op == "kl" else reference.jsd_of_logits(p, q, 0.3)
        return float((weights * div).sum())

    def mlx_total(p, q):
        div = losses.kl_of_logits(p, q)[0] if op == "kl" else losses.jsd_of_logits(p, q, 0.3)[0]
        return (mx.array(weights, dtype=mx.float32) * div).sum()

    p32, q32 = mx.array(p_logits, dtype=mx.float32), mx.array(q_logits, dtype=mx.float32)
    np.testing.assert_allclose(mlx_total(p32, q32).item(), ref(p_logits, q_logits), rtol=1e-5)
    grad_p, grad_q = mx.grad(mlx_total, argnums=(0, 1))(p32, q32)
    for arg, got in ((0, grad_p), (1, grad_q)):
        want = np.zeros_like(p_logits)
        for idx in np.ndindex(p_logits.shape):
            step = np.zeros_like(p_logits)
            step[idx] = 1e-6
            plus, minus = [p_logits, q_logits], [p_logits, q_logits]
            plus[arg], minus[arg] = plus[arg] + step, minus[arg] - step
            want[idx] = (ref(*plus) - ref(*minus)) / 2e-6
        np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-5)


def test_every_loss_function_has_a_twin_with_the_same_arguments():
    """reference.py mirrors losses.py name for name and argument for argument (options keyword-only, no defaults)."""
    import inspect

    public = {
        name: fn
        for name, fn in vars(losses).items()
        if not name.startswith("_")
        and callable(fn)
        and getattr(fn, "__module__", losses.__name__) == losses.__name__
        and not inspect.isclass(fn)
        and name != "DIVERGENCES"
    }
    assert {
        "sdft_loss",
        "sdft_loss_topk",
        "sdft_loss_chunked",
        "token_divergence",
        "kl_of_logits",
    } <= public.keys()
    for name, fn in public.items():
        twin = getattr(reference, name, None)
        assert twin is not None, f"reference.{name} is missing"
        params = [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
        assert params == [(p.name, p.kind) for p in inspect.signature(twin).parameters.values()], (
            name
        )
        options = [p for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]
        assert all(p.default is p.empty for p in options), (
            f"{name}: options have no defaults of their own"
        )
