"""Float64 numpy twin of `mlx_sdft.core.losses`, written to be read: same names, same signatures.

Slow and obvious on purpose (explicit sums, a loop over sequences). It is what the MLX loss is
tested against, and `sdft_loss_grad` writes down the gradient with respect to the student
logits in closed form. Numpy arrays in; `sdft_loss` returns Python `(float, int)`.
"""

import numpy as np

DIVERGENCES = ("forward", "reverse", "jsd")


def log_softmax(logits_BTV: np.ndarray) -> np.ndarray:
    """log p_v = z_v − m − log Σ_u exp(z_u − m), with m = max_u z_u, in float64."""
    z_BTV = np.asarray(logits_BTV, dtype=np.float64)
    shifted_BTV = z_BTV - z_BTV.max(axis=-1, keepdims=True)
    return shifted_BTV - np.log(np.exp(shifted_BTV).sum(axis=-1, keepdims=True))


def kl(p_logprobs_BTV: np.ndarray, q_logprobs_BTV: np.ndarray) -> np.ndarray:
    """KL(p‖q) = Σ_v p_v (log p_v − log q_v) → kl_BT."""
    p_BTV = np.exp(p_logprobs_BTV)
    return np.sum(p_BTV * (p_logprobs_BTV - q_logprobs_BTV), axis=-1)


def _mixture_logprobs(student_logprobs_BTV, teacher_logprobs_BTV, beta):
    """log m with m = (1−β)·p + β·q, in log space so tiny probabilities do not underflow to log 0."""
    return np.logaddexp(np.log(1.0 - beta) + student_logprobs_BTV, np.log(beta) + teacher_logprobs_BTV)


def generalized_jsd(student_logprobs_BTV: np.ndarray, teacher_logprobs_BTV: np.ndarray, beta: float) -> np.ndarray:
    """m = (1−β)·p + β·q;  jsd = β·KL(q‖m) + (1−β)·KL(p‖m),  0 < β < 1 → jsd_BT."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
    m_logprobs_BTV = _mixture_logprobs(student_logprobs_BTV, teacher_logprobs_BTV, beta)
    return beta * kl(teacher_logprobs_BTV, m_logprobs_BTV) + (1.0 - beta) * kl(student_logprobs_BTV, m_logprobs_BTV)


def token_divergence(student_logits_BTV, teacher_logits_BTV, divergence="forward", beta=0.5) -> np.ndarray:
    """forward = KL(q‖p), reverse = KL(p‖q), jsd = generalized_jsd(p, q, β); p student, q teacher → div_BT."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
    logp_BTV = log_softmax(student_logits_BTV)
    logq_BTV = log_softmax(teacher_logits_BTV)
    if divergence == "forward":
        return kl(logq_BTV, logp_BTV)
    if divergence == "reverse":
        return kl(logp_BTV, logq_BTV)
    return generalized_jsd(logp_BTV, logq_BTV, beta)


def loss_mask(mask_BT: np.ndarray, skip: int) -> np.ndarray:
    """w_j = mask_j · 1[j ≥ skip] → weights_BT (float64)."""
    if skip < 0:
        raise ValueError(f"skip must be ≥ 0, got {skip}")
    weights_BT = np.array(mask_BT, dtype=np.float64)
    weights_BT[..., :skip] = 0.0
    return weights_BT


def sdft_loss(student_logits, teacher_logits, mask, divergence="forward", skip=3, beta=0.5) -> tuple[float, int]:
    """loss = (1/B) Σ_i [Σ_t w_it·div_it / max(Σ_t w_it, 1)],  ntoks = Σ w."""
    div_BT = token_divergence(student_logits, teacher_logits, divergence, beta)
    weights_BT = loss_mask(mask, skip)
    B = div_BT.shape[0]
    total = 0.0
    for i in range(B):
        count = max(weights_BT[i].sum(), 1.0)
        total += np.sum(weights_BT[i] * div_BT[i]) / count
    return float(total / B), int(weights_BT.sum())


def sdft_loss_grad(student_logits, teacher_logits, mask, divergence="forward", skip=3, beta=0.5) -> np.ndarray:
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
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")
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
        token_grad_BTV = p_BTV * (logp_BTV - logq_BTV - kl(logp_BTV, logq_BTV)[..., None])
    else:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd needs 0 < beta < 1, got beta={beta}")
        logm_BTV = _mixture_logprobs(logp_BTV, logq_BTV, beta)
        token_grad_BTV = (1.0 - beta) * p_BTV * (logp_BTV - logm_BTV - kl(logp_BTV, logm_BTV)[..., None])
    return token_grad_BTV * c_BT[..., None]


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


def sdft_loss_topk(student_logits, teacher_logits, mask, k, divergence="forward", skip=3, beta=0.5) -> tuple[float, int]:
    """Top-K twin: the teacher's k most likely tokens + a tail bucket, then the full-vocab recipe."""
    teacher_lp = log_softmax(teacher_logits)
    idx = np.argsort(-teacher_lp, axis=-1, kind="stable")[..., :k]
    p = bucket_logprobs(log_softmax(student_logits), idx)
    q = bucket_logprobs(teacher_lp, idx)
    with np.errstate(invalid="ignore", divide="ignore"):
        if divergence == "forward":
            div = np.nansum(np.exp(q) * (q - p), axis=-1)
        elif divergence == "reverse":
            div = np.nansum(np.exp(p) * (p - q), axis=-1)
        else:
            div = generalized_jsd(p, q, beta)
    w = loss_mask(mask, skip)
    per_seq = [(w[i] * div[i]).sum() / max(w[i].sum(), 1.0) for i in range(len(w))]
    return float(np.mean(per_seq)), int(w.sum())


def sdft_loss_from_hidden(student_hidden, teacher_hidden, head_weight, mask, temperature=1.0, divergence="forward",
                          skip=3, beta=0.5) -> tuple[float, int]:
    """Twin of `losses.sdft_loss_chunked` with a linear LM head (logits = hidden · Wᵀ / τ):
    chunking over positions changes when logits exist, not the loss."""
    W = np.asarray(head_weight, np.float64)
    return sdft_loss(np.asarray(student_hidden, np.float64) @ W.T / temperature,
                     np.asarray(teacher_hidden, np.float64) @ W.T / temperature, mask, divergence, skip, beta)


def sdft_loss_from_hidden_grad(student_hidden, teacher_hidden, head_weight, mask, temperature=1.0,
                               divergence="forward", skip=3, beta=0.5) -> np.ndarray:
    """∂loss/∂(student hidden) = (∂loss/∂logits) · W / τ → grad_BTD."""
    W = np.asarray(head_weight, np.float64)
    grad_BTV = sdft_loss_grad(np.asarray(student_hidden, np.float64) @ W.T / temperature,
                              np.asarray(teacher_hidden, np.float64) @ W.T / temperature, mask, divergence, skip, beta)
    return grad_BTV @ W / temperature
