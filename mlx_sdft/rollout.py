"""On-policy sampling: the current student weights answer a batch of prompts.

Built on mlx-lm's `BatchGenerator` (continuous batching with a KV cache). Unlike
`batch_generate`, the stop token is kept: the teacher scores it too, so the student
learns when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler


@dataclass
class Rollout:
    completions: list[list[int]]  # sampled token ids, the stop token included when one was sampled
    truncated: list[bool]  # True where the completion hit its token limit without stopping
    prompt_tokens: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def sample(
    model: nn.Module,
    prompts: list[list[int]],
    max_tokens: list[int],
    stop_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> Rollout:
    """One completion per prompt (repeat a prompt to get several), in the order given."""
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in stop_ids],
        sampler=make_sampler(temp=temperature, top_p=top_p),
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert(prompts, max_tokens)
        tokens = {uid: [] for uid in uids}
        truncated = {}
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    truncated[r.uid] = r.finish_reason == "length"
    finally:
        gen.close()
        model.train(was_training)
    return Rollout(
        completions=[tokens[u] for u in uids],
        truncated=[truncated[u] for u in uids],
        prompt_tokens=sum(len(p) for p in prompts),
    )
