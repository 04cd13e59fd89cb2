"""--log-completions: what the student sampled. Every report, the first N completions of the
step's first micro-batch with their own loss, so a run is never trained blind (TRL's
`log_completions`)."""

from __future__ import annotations

from mlx_sdft.core import guards
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.rollout import Rollout


def sampled_rows(
    pairs: list[PromptPair], rollout: Rollout, losses: list[float], masked: bool = False
) -> list[dict]:
    """The first len(losses) completions as {where, prompt_ids, completion_ids, truncated, masked, loss}:
    `losses` are the completions' own SDFT losses from the training pass (Objective.student_loss's
    `own_N`, before this step's update; the pure divergence, without the guards' extra terms such as
    --sft-weight). `masked` (--truncated mask): a truncated completion is marked, as it trained on nothing."""
    return [
        {
            "where": pairs[i].where,
            "prompt_ids": pairs[i].student_ids,
            "completion_ids": rollout.completions[i],
            "truncated": bool(rollout.truncated[i]),
            "masked": masked
            and guards.maskable([rollout.truncated[i]], [pairs[i].demonstrated])[0],
            "loss": loss,
        }
        for i, loss in enumerate(losses)
    ]


def records(tokenizer, step: int, rows: list[dict]) -> list[dict]:
    """What completions.jsonl holds per completion: the rendered prompt and the completion as text
    (special tokens kept, so a sampled stop token shows), its length, truncation and loss."""
    return [
        {
            "step": step,
            "where": r["where"],
            "prompt": tokenizer.decode(r["prompt_ids"]),
            "completion": tokenizer.decode(r["completion_ids"]),
            "tokens": len(r["completion_ids"]),
            "truncated": r["truncated"],
            **({"masked": True} if r.get("masked") else {}),
            "loss": r["loss"],
        }
        for r in rows
    ]
