"""Float64 numpy twin of `mlx_sdft.core.losses`, written to be read: the same names, the same
arguments (options keyword-only, without defaults), numpy arrays in.

Slow and obvious on purpose (explicit sums, loops over sequences). It is what the MLX loss is
tested against. The twin of an MLX op that also returns what its backward pass needs
(`kl_of_logits`, `jsd_of_logits`) returns the divergence only; losses return Python
`(float, int)`. The `*_grad` functions, which have no MLX twin, write down the gradient with
respect to the student's side in closed form. The whole objective, `regularized_loss`, and its
gradient take the guards' inputs and weights as one `Guards`.
"""

from dataclasses import dataclass

import numpy as np

from mlx_sdft.config import DIVERGENCES


def log_softmax(logits_BTV: np.ndarray) -> np.ndarray:
    """log p_v = z_v − m − log Σ_u exp(z_u − m), with m = max_u z_u, in float64."""
    z_BTV = np.asarray(logits_BTV, dtype=np.float64)
    shifted_BTV = z_BTV - z_BTV.max(axis=-1, keepdims=True)
    return shifted_BTV - np.log(np.exp(shifted_BTV).sum(axis=-1, keepdims=True))


def _kl(p_logprobs_BTV: np.ndarray, q_logprobs_BTV: np.ndarray) -> np.ndarray:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) → kl_BT, with 0·log 0 = 0 (an empty top-K tail)."""
    p_BTV = np.exp(p_logprobs_BTV)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(p_BTV > 0, p_BTV * (p_logprobs_BTV - q_logprobs_BTV), 0.0), axis=-1)


def _mixture_logprobs(p_logprobs_BTV, q_logprobs_BTV, beta):
    """log m with m = (1−β)·p + β·q, in log space so tiny probabilities do not underflow to log 0."""
    return np.logaddexp(np.log(1.0 - beta) + p_logprobs_BTV, np.log(beta) + q_logprobs_BTV)


def kl_of_logits(p_logits_BTV: np.ndarray, q_logits_BTV: np.ndarray) -> np.ndarray:
    """KL(softmax(p_logits) ‖ softmax(q_logits)) → kl_BT."""
    return _kl(log_softmax(p_logits_BTV), log_softmax(q_logits_BTV))


def jsd_of_logits(p_logits_BTV: np.ndarray, q_logits_BTV: np.ndarray, beta: float) -> np.ndarray:
    """m = (1−β)·p + β·q;  jsd = β·KL(q‖m) + (1−β)·KL(p‖m),  0 < β < 1 → jsd_BT."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
    logp_BTV, logq_BTV = log_softmax(p_logits_BTV), log_softmax(q_logits_BTV)
    logm_BTV = _mixture_logprobs(logp_BTV, logq_BTV, beta)
    return beta * _kl(logq_BTV, logm_BTV) + (1.0 - beta) * _kl(logp_BTV, logm_BTV)


def token_divergence(student_logits_BTV, teacher_logits_BTV, *, divergence, beta) -> np.ndarray:
    """forward = KL(q‖p), reverse = KL(p‖q), jsd; p student, q teacher → div_BT."""
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}"
        )
    if divergence == "forward":
        return kl_of_logits(teacher_logits_BTV, student_logits_BTV)
    if divergence == "reverse":
        return kl_of_logits(student_logits_BTV, teacher_logits_BTV)
    return jsd_of_logits(student_logits_BTV, teacher_logits_BTV, beta)


def loss_mask(mask_BT: np.ndarray, skip: int) -> np.ndarray:
    """w_j = mask_j · 1[j ≥ skip] → weights_BT (float64)."""
    if skip < 0:
        raise ValueError(f"skip must be ≥ 0, got {skip}")
    weights_BT = np.array(mask_BT, dtype=np.float64)
    weights_BT[..., :skip] = 0.0
    return weights_BT


def sequence_mean(div_BT: np.ndarray, mask: np.ndarray, skip: int) -> tuple[float, int]:
    """loss = (1/B) Σ_i [Σ_t w_it·div_it / max(Σ_t w_it, 1)],  ntoks = Σ w, w = loss_mask(mask, skip)."""
    weights_BT = loss_mask(mask, skip)
    B = weights_BT.shape[0]
    total = 0.0
    for i in range(B):
        count = max(weights_BT[i].sum(), 1.0)
        total += np.sum(weights_BT[i] * div_BT[i]) / count
    return float(total / B), int(weights_BT.sum())


def sdft_loss(student_logits, teacher_logits, mask, *, divergence, skip, beta) -> tuple[float, int]:
    """`sequence_mean` of `token_divergence` → (loss, ntoks)."""
    return sequence_mean(
        token_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta),
        mask,
        skip,
    )


def sdft_loss_grad(student_logits, teacher_logits, mask, *, divergence, skip, beta) -> np.ndarray:
    """∂loss/∂(student logits) in closed form → grad_BTV. The teacher logits get no gradient.

    With p = softmax(student), q = softmax(teacher), token weight c_ij = w_ij / (max(Σ_t w_it, 1)·B):
      forward  KL(q‖p):  (p − q) · c
      reverse  KL(p‖q):  p ⊙ (log p − log q − KL(p‖q)) · c
      jsd:               (1−β) · p ⊙ (log p − log m − KL(p‖m)) · c,   m = (1−β)p + βq
    Derivation for jsd: ∂jsd/∂p_v = −β(1−β)·q_v/m_v + (1−β)(log p_v + 1 − log m_v − (1−β)·p_v/m_v)
    = (1−β)(log p_v − log m_v), because β·q_v + (1−β)·p_v = m_v. Then the softmax Jacobian
    ∂p_v/∂z_u = p_v(δ_vu − p_u) turns any g_v = ∂L/∂p_v into p ⊙ (g − Σ_v p_v g_v).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(
            f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}"
        )
    logp_BTV = log_softmax(student_logits)
    logq_BTV = log_softmax(teacher_logits)
    p_BTV, q_BTV = np.exp(logp_BTV), np.exp(logq_BTV)
    weights_BT = loss_mask(mask, skip)
    B = weights_BT.shape[0]
    count_B = np.maximum(weights_BT.sum(axis=-1), 1.0)
    c_BT = weights_BT / (count_B[:, None] * B)

    if divergence == "forward":
        token_grad_BTV = p_BTV - q_BTV
    elif divergence == "reverse":
        token_grad_BTV = p_BTV * (logp_BTV - logq_BTV - _kl(logp_BTV, logq_BTV)[..., None])
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
        logm_BTV = _mixture_logprobs(logp_BTV, logq_BTV, beta)
        token_grad_BTV = (
            (1.0 - beta) * p_BTV * (logp_BTV - logm_BTV - _kl(logp_BTV, logm_BTV)[..., None])
        )
    return token_grad_BTV * c_BT[..., None]


class LinearHead:
    """logits = hidden · Wᵀ / τ: an LM head (temperature included) for `sdft_loss_chunked`'s
    `logits_of`, with the backward pass written down for `sdft_loss_chunked_grad`."""

    def __init__(self, weight_VD, temperature: float):
        self.weight_VD, self.temperature = np.asarray(weight_VD, np.float64), temperature

    def __call__(self, hidden_BTD):
        return np.asarray(hidden_BTD, np.float64) @ self.weight_VD.T / self.temperature

    def backward(self, grad_BTV):
        return grad_BTV @ self.weight_VD / self.temperature


def sdft_loss_chunked(
    logits_of, student_hidden, teacher_hidden, mask, *, chunk, divergence, skip, beta
) -> tuple[float, int]:
    """`sdft_loss` of `logits_of(hidden)`, the logits computed `chunk` positions at a time:
    chunking changes when logits exist, not the loss."""
    T = np.shape(student_hidden)[1]
    student_BTV, teacher_BTV = (
        np.concatenate([logits_of(h[:, t : t + chunk]) for t in range(0, T, chunk)], axis=1)
        for h in (np.asarray(student_hidden), np.asarray(teacher_hidden))
    )
    return sdft_loss(student_BTV, teacher_BTV, mask, divergence=divergence, skip=skip, beta=beta)


def sdft_loss_chunked_grad(
    logits_of: LinearHead, student_hidden, teacher_hidden, mask, *, chunk, divergence, skip, beta
) -> np.ndarray:
    """∂loss/∂(student hidden) = (∂loss/∂logits) · W / τ → grad_BTD (chunks change nothing)."""
    grad_BTV = sdft_loss_grad(
        logits_of(student_hidden),
        logits_of(teacher_hidden),
        mask,
        divergence=divergence,
        skip=skip,
        beta=beta,
    )
    return logits_of.backward(grad_BTV)


def bucket_logprobs(logprobs_BTV, idx_BTK) -> np.ndarray:
    """log p on the K chosen tokens, then log of the mass of all other tokens → [B, T, K+1]."""
    B, T, V = logprobs_BTV.shape
    out = np.zeros((B, T, idx_BTK.shape[-1] + 1))
    for b in range(B):
        for t in range(T):
            chosen = [int(i) for i in idx_BTK[b, t]]
            rest = [v for v in range(V) if v not in chosen]
            out[b, t, :-1] = logprobs_BTV[b, t, chosen]
            out[b, t, -1] = np.log(np.exp(logprobs_BTV[b, t, rest]).sum()) if rest else -np.inf
    return out


def teacher_topk(teacher_logits_BTV, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's k most likely tokens per position (most likely first) and its bucket
    log-probabilities on them (+ tail) → (idx_BTK, buckets_BTK1)."""
    teacher_logprobs_BTV = log_softmax(teacher_logits_BTV)
    idx_BTK = np.argsort(-teacher_logprobs_BTV, axis=-1, kind="stable")[..., :k]
    return idx_BTK, bucket_logprobs(teacher_logprobs_BTV, idx_BTK)


def sdft_loss_topk(
    student_logits, teacher_idx, teacher_buckets, mask, *, divergence, skip, beta
) -> tuple[float, int]:
    """The teacher's top-K buckets (+ tail) against the student's mass on the same buckets, then
    the full-vocabulary recipe (bucket log-probabilities are their own logits)."""
    student_buckets = bucket_logprobs(log_softmax(student_logits), np.asarray(teacher_idx))
    return sdft_loss(
        student_buckets,
        np.asarray(teacher_buckets, np.float64),
        mask,
        divergence=divergence,
        skip=skip,
        beta=beta,
    )


def sft_loss(logits, targets, mask) -> tuple[float, int]:
    """Token-mean cross-entropy −Σ mask·log p(target) / max(Σ mask, 1) → (loss, ntoks)."""
    logprobs_BTV = log_softmax(logits)
    B, T, _ = logprobs_BTV.shape
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                total -= logprobs_BTV[b, t, int(targets[b, t])]
                count += 1
    return total / max(count, 1), count


def sft_loss_grad(logits, targets, mask) -> np.ndarray:
    """∂loss/∂z = (p − onehot(target))·mask / max(Σ mask, 1)."""
    p_BTV = np.exp(log_softmax(logits))
    onehot_BTV = np.eye(p_BTV.shape[-1])[np.asarray(targets, dtype=int)]
    w_BT = np.asarray(mask, dtype=np.float64) / max(float(np.sum(mask)), 1.0)
    return (p_BTV - onehot_BTV) * w_BT[..., None]


# --- guards (`mlx_sdft.core.guards`) ----------------------------------------------------------


def keep_rows(mask_BT, truncated_B, mode) -> np.ndarray:
    """ "keep": the mask; "mask": the rows of truncated completions set to 0."""
    out = np.array(mask_BT, dtype=np.float64)
    if mode == "mask":
        for b, t in enumerate(truncated_B):
            if t:
                out[b] = 0.0
    return out


@dataclass(frozen=True)
class Guards:
    """What the guards add to the SDFT term of `regularized_loss` and `regularized_loss_grad`,
    each guard off by default: --truncated (`keep_rows`), --sft-weight λ on the demonstrations'
    cross-entropy (their logits, targets and mask), --base-kl-weight μ on KL(base‖student)."""

    truncated_mode: str = "keep"
    sft_weight: float = 0.0
    demo_logits: np.ndarray | None = None
    demo_targets: np.ndarray | None = None
    demo_mask: np.ndarray | None = None
    base_kl_weight: float = 0.0
    base_logits: np.ndarray | None = None


def regularized_loss(
    student_logits, teacher_logits, mask, truncated, guards, *, divergence, skip, beta
) -> float:
    """The training objective with every guard:
    sdft_loss(student, teacher, m, divergence, skip) + λ·sft_loss(demo) + μ·sdft_loss(student, base, m, forward, 0),
    m = keep_rows(mask, truncated, guards.truncated_mode); the base term is KL(base‖student) per
    token."""
    m = keep_rows(mask, truncated, guards.truncated_mode)
    total = sdft_loss(
        student_logits, teacher_logits, m, divergence=divergence, skip=skip, beta=beta
    )[0]
    if guards.sft_weight:
        total += (
            guards.sft_weight
            * sft_loss(guards.demo_logits, guards.demo_targets, guards.demo_mask)[0]
        )
    if guards.base_kl_weight:
        total += (
            guards.base_kl_weight
            * sdft_loss(
                student_logits, guards.base_logits, m, divergence="forward", skip=0, beta=0.5
            )[0]
        )
    return total


def regularized_loss_grad(
    student_logits, teacher_logits, mask, truncated, guards, *, divergence, skip, beta
):
    """(∂/∂ student logits, ∂/∂ demonstration logits) of `regularized_loss`:
    sdft_loss_grad(m) + μ·(p − q_base)·c₀ and λ·(p_demo − onehot(target))·mask/Σmask."""
    m = keep_rows(mask, truncated, guards.truncated_mode)
    grad_BTV = sdft_loss_grad(
        student_logits, teacher_logits, m, divergence=divergence, skip=skip, beta=beta
    )
    if guards.base_kl_weight:
        grad_BTV = grad_BTV + guards.base_kl_weight * sdft_loss_grad(
            student_logits, guards.base_logits, m, divergence="forward", skip=0, beta=0.5
        )
    demo_grad = (
        guards.sft_weight * sft_loss_grad(guards.demo_logits, guards.demo_targets, guards.demo_mask)
        if guards.sft_weight
        else None
    )
    return grad_BTV, demo_grad
