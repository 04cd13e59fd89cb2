"""The SDFT loss: per-token divergences between student and teacher, masked and averaged.

Pure MLX functions of arrays, no model, config or I/O. Argument order states direction:
`kl_of_logits(p_logits, q_logits)` is KL(p‖q). Loss options are keyword-only and have no
defaults here (the options in mlx_sdft.config hold them). `mlx_sdft.core.reference` is the float64
numpy twin of every function here, name for name and argument for argument;
`tests/core/test_losses.py` checks the two agree on values and gradients.

Shapes: B sequences, T completion positions (position j scores completion token j), V vocab.
"""

import functools
import math

import mlx.core as mx

from mlx_sdft.config import DIVERGENCES

_BLOCK = 128


def _sum_vocab(x_BTV: mx.array) -> mx.array:
    """Σ_v x_v over the last axis, keeping the last axis (size 1), summed in blocks of 128.

    MLX's CPU backend adds a row up nearly sequentially in float32: at V = 49152 the relative
    error of Σ exp reaches ~1e-4. Summing 128 strided partial sums first brings it to ~1e-6.
    """
    *lead, V = x_BTV.shape
    if V <= _BLOCK:
        return x_BTV.sum(axis=-1, keepdims=True)
    pad = -V % _BLOCK
    if pad:  # zeros leave every sum here unchanged
        x_BTV = mx.pad(x_BTV, [(0, 0)] * len(lead) + [(0, pad)])
    return x_BTV.reshape(*lead, -1, _BLOCK).sum(axis=-2).sum(axis=-1, keepdims=True)


def log_softmax(logits_BTV: mx.array) -> mx.array:
    """log p_v = z_v − m − log Σ_u exp(z_u − m), with m = max_u z_u, computed in float32."""
    return _log_softmax_f32(logits_BTV.astype(mx.float32))  # bf16/fp16 lose too much in exp and sum


@mx.custom_function
def _log_softmax_f32(logits_BTV: mx.array) -> mx.array:
    shifted_BTV = logits_BTV - logits_BTV.max(axis=-1, keepdims=True)
    return shifted_BTV - mx.log(_sum_vocab(mx.exp(shifted_BTV)))


@_log_softmax_f32.vjp
def _log_softmax_f32_vjp(primals, cotangent_BTV, logprobs_BTV):
    """∂/∂z_u = g_u − p_u Σ_v g_v. Written out so that Σ_v g_v is summed in blocks too: the
    automatic VJP sums the cotangent sequentially, an error of ~2e-3 of the gradient's scale
    when p ≈ q at V = 49152."""
    return cotangent_BTV - mx.exp(logprobs_BTV) * _sum_vocab(cotangent_BTV)


def _logsumexp(logits_BTV: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(lse_BT1, exp(z − max)_BTV, Σ exp(z − max)_BT1), the sum blocked as in `_sum_vocab`."""
    max_BT1 = logits_BTV.max(axis=-1, keepdims=True)
    e_BTV = mx.exp(logits_BTV - max_BT1)
    sum_BT1 = _sum_vocab(e_BTV)
    return max_BT1 + mx.log(sum_BT1), e_BTV, sum_BT1


def kl_of_logits(p_logits_BTV: mx.array, q_logits_BTV: mx.array):
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) for p = softmax(p_logits), q = softmax(q_logits)
    → (kl_BT, lse_p_BT1, lse_q_BT1). One operation with a closed-form gradient, so the backward
    pass keeps the two logit arrays and nothing else [B, T, V]-sized."""
    return _kl_op(p_logits_BTV, q_logits_BTV)


@mx.custom_function
def _kl_op(p_logits_BTV: mx.array, q_logits_BTV: mx.array):
    lse_p_BT1, e_p_BTV, sum_p_BT1 = _logsumexp(p_logits_BTV)
    lse_q_BT1, _, _ = _logsumexp(q_logits_BTV)
    p_BTV = e_p_BTV * (1 / sum_p_BT1)  # p from the exp the log-sum-exp already took
    kl_BT = _sum_vocab(p_BTV * ((p_logits_BTV - lse_p_BT1) - (q_logits_BTV - lse_q_BT1))).squeeze(
        -1
    )
    return kl_BT, lse_p_BT1, lse_q_BT1


@_kl_op.vjp
def _kl_op_vjp(primals, cotangents, outputs):
    """∂KL(p‖q)/∂p_logits = p ⊙ (log p − log q − KL),  ∂KL(p‖q)/∂q_logits = q − p. Lazy
    evaluation computes only the one a caller differentiates (the student's side)."""
    p_logits_BTV, q_logits_BTV = primals
    kl_BT, lse_p_BT1, lse_q_BT1 = outputs
    g_BT1 = cotangents[0][..., None]
    logp_BTV, logq_BTV = p_logits_BTV - lse_p_BT1, q_logits_BTV - lse_q_BT1
    p_BTV = mx.exp(logp_BTV)
    return (
        p_BTV * (logp_BTV - logq_BTV - kl_BT[..., None]) * g_BT1,
        (mx.exp(logq_BTV) - p_BTV) * g_BT1,
    )


def jsd_of_logits(p_logits_BTV: mx.array, q_logits_BTV: mx.array, beta: float):
    """The generalized Jensen–Shannon divergence (GKD / official SDFT `alpha`) of p = softmax(p_logits)
    and q = softmax(q_logits) as one operation with a closed-form gradient → (jsd_BT, …); the rest
    of the tuple is for the backward pass.

    m = (1−β)·p + β·q  (in log space: mixing probabilities would underflow for confident ones),
    jsd = β·KL(q‖m) + (1−β)·KL(p‖m),  0 < β < 1.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
    return _jsd_op(float(beta))(p_logits_BTV, q_logits_BTV)


@functools.lru_cache(maxsize=None)
def _jsd_op(beta: float):
    def log_mixture(logp_BTV, logq_BTV):  # log m, m = (1−β)p + βq, in log space
        return mx.logaddexp(math.log(1.0 - beta) + logp_BTV, math.log(beta) + logq_BTV)

    @mx.custom_function
    def jsd(p_logits_BTV, q_logits_BTV):
        lse_p_BT1, e_p_BTV, sum_p_BT1 = _logsumexp(p_logits_BTV)
        lse_q_BT1, e_q_BTV, sum_q_BT1 = _logsumexp(q_logits_BTV)
        logp_BTV, logq_BTV = p_logits_BTV - lse_p_BT1, q_logits_BTV - lse_q_BT1
        logm_BTV = log_mixture(logp_BTV, logq_BTV)
        kl_pm_BT = _sum_vocab(e_p_BTV * (1 / sum_p_BT1) * (logp_BTV - logm_BTV)).squeeze(-1)
        kl_qm_BT = _sum_vocab(e_q_BTV * (1 / sum_q_BT1) * (logq_BTV - logm_BTV)).squeeze(-1)
        return beta * kl_qm_BT + (1.0 - beta) * kl_pm_BT, lse_p_BT1, lse_q_BT1, kl_pm_BT, kl_qm_BT

    @jsd.vjp
    def jsd_vjp(primals, cotangents, outputs):
        """∂jsd/∂p_logits = (1−β) p ⊙ (log p − log m − KL(p‖m)), and with β and the roles
        swapped for q_logits; lazy evaluation computes only the side a caller differentiates."""
        p_logits_BTV, q_logits_BTV = primals
        _, lse_p_BT1, lse_q_BT1, kl_pm_BT, kl_qm_BT = outputs
        g_BT1 = cotangents[0][..., None]
        logp_BTV, logq_BTV = p_logits_BTV - lse_p_BT1, q_logits_BTV - lse_q_BT1
        logm_BTV = log_mixture(logp_BTV, logq_BTV)
        return (
            (1.0 - beta) * mx.exp(logp_BTV) * (logp_BTV - logm_BTV - kl_pm_BT[..., None]) * g_BT1,
            beta * mx.exp(logq_BTV) * (logq_BTV - logm_BTV - kl_qm_BT[..., None]) * g_BT1,
        )

    return jsd


def token_divergence(
    student_logits_BTV: mx.array, teacher_logits_BTV: mx.array, *, divergence: str, beta: float
) -> mx.array:
    """The per-token divergence between the student's and the teacher's distributions over the
    last axis → div_BT; the one place a divergence is chosen. No gradient reaches the teacher.

    forward = KL(q‖p) (the loss behind the paper's numbers), reverse = KL(p‖q),
    jsd = the generalized Jensen–Shannon divergence (`jsd_of_logits`), with p = softmax(student),
    q = softmax(teacher).
    The last axis is the vocabulary, or top-K buckets given as log-probabilities (normalized
    log-probabilities are their own logits). Each is one op with the closed-form gradient of
    `reference.sdft_loss_grad` (`kl_of_logits`, `jsd_of_logits`). ValueError for an unknown name.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}"
        )
    student_BTV = student_logits_BTV.astype(mx.float32)
    teacher_BTV = mx.stop_gradient(teacher_logits_BTV).astype(mx.float32)
    if divergence == "forward":
        return kl_of_logits(teacher_BTV, student_BTV)[0]
    if divergence == "reverse":
        return kl_of_logits(student_BTV, teacher_BTV)[0]
    return jsd_of_logits(student_BTV, teacher_BTV, beta)[0]


def loss_mask(mask_BT: mx.array, skip: int) -> mx.array:
    """w_j = mask_j · 1[j ≥ skip] as float32 → weights_BT.

    The first `skip` completion tokens are dropped because the teacher tends to open with
    artifacts of its context ("Based on the example…"); see docs/method.md, "The guards" (the skipped prefix).
    """
    if skip < 0:
        raise ValueError(f"skip must be ≥ 0, got {skip}")
    T = mask_BT.shape[-1]
    return mask_BT.astype(mx.float32) * (mx.arange(T) >= skip).astype(mx.float32)


def sdft_loss(
    student_logits: mx.array,
    teacher_logits: mx.array,
    mask: mx.array,
    *,
    divergence: str,
    skip: int,
    beta: float,
) -> tuple[mx.array, mx.array]:
    """Mean over sequences of each sequence's masked token-mean divergence → (loss, ntoks).

    w = loss_mask(mask, skip);  L_i = Σ_t w_it·div_it / max(Σ_t w_it, 1);  loss = (1/B) Σ_i L_i.
    ntoks = Σ w, the number of loss tokens. Logits are [B, T, V] aligned to the completion tokens,
    mask is [B, T] with 1 on real completion tokens. Not a token-mean over the batch: a short
    sequence weighs as much as a long one, as in the official code.
    """
    div_BT = token_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta)
    return sequence_mean(div_BT, mask, skip)


def sdft_loss_chunked(
    logits_of,
    student_hidden: mx.array,
    teacher_hidden: mx.array,
    mask: mx.array,
    *,
    chunk: int,
    divergence: str,
    skip: int,
    beta: float,
) -> tuple[mx.array, mx.array]:
    """`sdft_loss(logits_of(student_hidden), logits_of(teacher_hidden), …)`, `chunk` completion
    positions at a time → (loss, ntoks).

    `logits_of` maps hidden states to logits (the frozen LM head, temperature included). Each
    chunk runs under mx.checkpoint, so its [B, chunk, V] logits are recomputed in the backward
    pass instead of kept: the [B, T, V] logits of neither role are ever whole in memory.
    """

    def chunk_divergence(student_BCD, teacher_BCD):
        return token_divergence(
            logits_of(student_BCD), logits_of(teacher_BCD), divergence=divergence, beta=beta
        )

    chunk_divergence = mx.checkpoint(chunk_divergence)
    student_hidden_BTD, teacher_hidden_BTD = student_hidden, mx.stop_gradient(teacher_hidden)
    T = student_hidden_BTD.shape[1]
    div_BT = mx.concatenate(
        [
            chunk_divergence(
                student_hidden_BTD[:, t : t + chunk], teacher_hidden_BTD[:, t : t + chunk]
            )
            for t in range(0, T, chunk)
        ],
        axis=1,
    )
    return sequence_mean(div_BT, mask, skip)


def sequence_mean(div_BT: mx.array, mask: mx.array, skip: int) -> tuple[mx.array, mx.array]:
    """(1/B) Σ_i Σ_t w_it·div_it / max(Σ_t w_it, 1) with w = loss_mask(mask, skip) → (loss, ntoks)."""
    weights_BT = loss_mask(mask, skip)
    # Clamping the count at 1 makes a sequence with no loss tokens contribute 0, never 0/0.
    count_B = mx.maximum(weights_BT.sum(axis=-1), 1.0)
    per_sequence_B = (weights_BT * div_BT).sum(axis=-1) / count_B
    return per_sequence_B.mean(), weights_BT.sum().astype(mx.int32)


def bucket_logprobs(logprobs_BTV: mx.array, idx_BTK: mx.array) -> mx.array:
    """Log-probabilities on K chosen tokens plus one tail bucket holding the rest → [B, T, K+1].

    The tail is a log-sum-exp over the tokens not chosen (not log(1 − Σ p), which cancels
    catastrophically when the K tokens hold nearly all the mass).
    """
    chosen_BTK = mx.take_along_axis(logprobs_BTV, idx_BTK, axis=-1)
    hit_BTV = mx.put_along_axis(
        mx.zeros(logprobs_BTV.shape, dtype=mx.bool_), idx_BTK, mx.array(True), axis=-1
    )
    tail_BT1 = mx.logsumexp(mx.where(hit_BTV, -mx.inf, logprobs_BTV), axis=-1, keepdims=True)
    # An empty tail (K = V) is log 0; a finite floor makes its term 0·(a − b) = 0, not 0·NaN.
    return mx.concatenate([chosen_BTK, mx.maximum(tail_BT1, -1e9)], axis=-1)


def teacher_topk(teacher_logits_BTV: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The teacher's k most likely tokens per position and its bucket log-probabilities on them
    (+ tail): all the top-K loss needs, so the [B, T, V] teacher logits can be freed."""
    teacher_logprobs_BTV = log_softmax(mx.stop_gradient(teacher_logits_BTV))
    idx_BTK = mx.argpartition(-teacher_logprobs_BTV, kth=k - 1, axis=-1)[..., :k]
    return idx_BTK, bucket_logprobs(teacher_logprobs_BTV, idx_BTK)


def sdft_loss_topk(
    student_logits: mx.array,
    teacher_idx: mx.array,
    teacher_buckets: mx.array,
    mask: mx.array,
    *,
    divergence: str,
    skip: int,
    beta: float,
) -> tuple[mx.array, mx.array]:
    """`sdft_loss` on the teacher's top-K support with a tail bucket (`--topk K`): both
    distributions are collapsed onto the K teacher-chosen tokens plus "everything else", then
    the same divergence and aggregation apply. With K = V it equals `sdft_loss`."""
    student_BTK1 = bucket_logprobs(log_softmax(student_logits), teacher_idx)
    div_BT = token_divergence(student_BTK1, teacher_buckets, divergence=divergence, beta=beta)
    return sequence_mean(div_BT, mask, skip)


def sft_loss(logits: mx.array, targets: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Next-token cross-entropy on the demonstration → (loss, ntoks), the `--method sft` baseline.

    loss = Σ_bt mask_bt · (−log p_bt(targets_bt)) / max(Σ mask, 1): a token mean over the batch,
    as mlx_lm.lora computes it. Logits [B, T, V] aligned to targets [B, T] (int), mask [B, T].
    """
    logprobs_BTV = log_softmax(logits)
    target_logprobs_BT = mx.take_along_axis(
        logprobs_BTV, targets[..., None].astype(mx.int32), axis=-1
    ).squeeze(-1)
    mask_BT = mask.astype(mx.float32)
    ntoks = mask_BT.sum()
    return -(mask_BT * target_logprobs_BT).sum() / mx.maximum(ntoks, 1.0), ntoks.astype(mx.int32)
