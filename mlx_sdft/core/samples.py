"""--log-completions: what the student sampled. Every report, the first N completions of the
step's last micro-batch with their own loss, so a run is never trained blind (TRL's
`log_completions`)."""

from __future__ import annotations

from mlx.utils import tree_map

from mlx_sdft.core import guards
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.rollout import Rollout


def row_scores(teacher_scores, i: int, length: int):
    """Row i of the teacher's scores (full logits, top-K buckets or hidden states, each [B, T, ...]),
    cut to that completion's `length` positions."""
    return tree_map(lambda a: a[i:i + 1, :length], teacher_scores)


def sampled_rows(student_loss, model, pairs: list[PromptPair], rollout: Rollout, teacher_scores, n: int,
                 masked: bool = False) -> list[dict]:
    """The first n completions as {where, prompt_ids, completion_ids, truncated, masked, loss}: `loss`
    is the completion's own SDFT loss (the objective's student_loss on a batch of one, before this
    step's update; the pure divergence, without the guards' extra terms such as --sft-weight).
    `masked` (--truncated mask): a truncated completion is marked, as it trained on nothing."""
    rows = []
    for i in range(min(n, len(pairs))):
        ids = rollout.completions[i]
        loss = student_loss(model, [pairs[i]], [ids], row_scores(teacher_scores, i, len(ids)))[0].item() if ids else 0.0
        rows.append({"where": pairs[i].where, "prompt_ids": pairs[i].student_ids, "completion_ids": ids,
                     "truncated": bool(rollout.truncated[i]),
                     "masked": masked and guards.maskable([rollout.truncated[i]], [pairs[i].demonstrated])[0],
                     "loss": loss})
    return rows


def records(tokenizer, step: int, rows: list[dict]) -> list[dict]:
    """What completions.jsonl holds per completion: the rendered prompt and the completion as text
    (special tokens kept, so a sampled stop token shows), its length, truncation and loss."""
    return [{"step": step, "where": r["where"], "prompt": tokenizer.decode(r["prompt_ids"]),
             "completion": tokenizer.decode(r["completion_ids"]), "tokens": len(r["completion_ids"]),
             "truncated": r["truncated"], **({"masked": True} if r.get("masked") else {}), "loss": r["loss"]}
            for r in rows]
