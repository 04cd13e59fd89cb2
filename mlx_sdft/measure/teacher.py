"""How much the teacher context (the demonstration in the prompt) adds, and how far the student's
own samples are from it; `mlx-sdft check` reports these before any training:

- demonstration log-likelihood: the mean log-probability per demonstration token after the
  student's prompt (the bare prompt) or the teacher's (prompt + demonstration);
- teacher agreement: on the student's samples, the mean per-token KL(teacher‖student) and the
  fraction of tokens where the teacher's most likely token is not the one sampled;
- the student's samples themselves, each within the completion budget training would give it:
  degenerate, truncated (what --truncated mask leaves out of the loss), their length.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_sdft.core.degeneration import degenerate_rate, len_ratio
from mlx_sdft.core.guards import Budget, completion_budget
from mlx_sdft.core.losses import kl_of_logits, log_softmax
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.rollout import sample
from mlx_sdft.core.scoring import completion_logits, completion_mask, pad_rows
from mlx_sdft.core.train import sequence_seed


def demonstration_loglik(model, pairs: list[PromptPair], role: str, batch_size: int) -> list[float]:
    """Mean log-probability per demonstration token, after the student's or the teacher's prompt."""
    out = []
    for i in range(0, len(pairs), batch_size):
        batch = pairs[i : i + batch_size]
        prompts = [p.student_ids if role == "student" else p.teacher_ids for p in batch]
        targets = [p.demo_ids for p in batch]
        logprobs_BTV = log_softmax(completion_logits(model, prompts, targets))
        token_BT = mx.take_along_axis(logprobs_BTV, pad_rows(targets)[..., None], axis=-1).squeeze(
            -1
        )
        mask_BT = completion_mask([len(t) for t in targets])
        out += ((token_BT * mask_BT).sum(-1) / mask_BT.sum(-1)).tolist()
    return out


def context_gain(model, pairs: list[PromptPair], batch_size: int) -> dict:
    """The demonstrations' mean per-token log-likelihood after the student's prompt and after the
    teacher's, averaged over demonstrations, and the share of demonstrations the teacher's makes
    more likely."""
    student = demonstration_loglik(model, pairs, "student", batch_size)
    teacher = demonstration_loglik(model, pairs, "teacher", batch_size)
    return {
        "examples": len(pairs),
        "student_loglik": sum(student) / len(student),
        "teacher_loglik": sum(teacher) / len(teacher),
        "improved_fraction": sum(t > s for s, t in zip(student, teacher)) / len(pairs),
    }


def teacher_agreement(
    student_logits_BTV: mx.array,
    teacher_logits_BTV: mx.array,
    completions_BT: mx.array,
    mask_BT: mx.array,
) -> tuple[float, float]:
    """(mean per-token KL(teacher‖student), fraction of tokens whose sampled id is not the
    teacher's argmax), both over the completion tokens in mask_BT."""
    kl_BT = kl_of_logits(
        teacher_logits_BTV.astype(mx.float32), student_logits_BTV.astype(mx.float32)
    )[0]
    differs_BT = (teacher_logits_BTV.argmax(axis=-1) != completions_BT).astype(mx.float32)
    n = mx.maximum(mask_BT.sum(), 1.0)
    return ((kl_BT * mask_BT).sum() / n).item(), ((differs_BT * mask_BT).sum() / n).item()


def score_samples(model, tokenizer, pairs: list[PromptPair], cfg) -> dict:
    """Student samples for `pairs`, each within the completion budget training would give it
    (`cfg`: CheckConfig's --completion-budget, --max-completion-length, --max-seq-length), scored under
    the teacher (the untrained model, as the EMA teacher starts): mean token KL, teacher disagreement,
    degenerate rate (token-weighted over batches), and the fraction that hit their budget without a
    stop token (`sample_truncated`: what --truncated mask leaves out of the loss)."""
    stops, bounds = sorted(tokenizer.eos_token_ids), Budget.of(cfg)
    kl_sum = differs_sum = tokens = 0.0
    completions, truncated = [], []
    for i in range(0, len(pairs), cfg.batch_size):
        batch = pairs[i : i + cfg.batch_size]
        seeds = [sequence_seed(0, i + j, 0) for j in range(len(batch))]
        budgets = [completion_budget(p, bounds) for p in batch]
        rollout = sample(
            model,
            [p.student_ids for p in batch],
            budgets,
            stops,
            temperature=1.0,
            batch_size=len(batch),
            seeds=seeds,
        )
        mask_BT = completion_mask([len(c) for c in rollout.completions])
        student_BTV = completion_logits(model, [p.student_ids for p in batch], rollout.completions)
        teacher_BTV = completion_logits(model, [p.teacher_ids for p in batch], rollout.completions)
        mean_kl, differs = teacher_agreement(
            student_BTV, teacher_BTV, pad_rows(rollout.completions), mask_BT
        )
        n = mask_BT.sum().item()
        kl_sum, differs_sum, tokens = kl_sum + mean_kl * n, differs_sum + differs * n, tokens + n
        completions += rollout.completions
        truncated += rollout.truncated
    return {
        "samples": len(completions),
        "sample_kl": kl_sum / max(tokens, 1),
        "teacher_disagreement": differs_sum / max(tokens, 1),
        "sample_degenerate": degenerate_rate(completions, truncated, stops),
        "sample_truncated": sum(truncated) / max(len(truncated), 1),
        "sample_len_ratio": len_ratio(completions, [p.demo_ids for p in pairs]),
        "completions": completions,
    }
