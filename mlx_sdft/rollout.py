"""On-policy sampling: the current student weights answer a batch of prompts.

Built on mlx-lm's `BatchGenerator` (continuous batching with a KV cache). Unlike
`batch_generate`, the stop token is kept: the teacher scores it too, so the student
learns when to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import apply_top_p, make_sampler


@dataclass
class Rollout:
    completions: list[list[int]]  # sampled token ids, the stop token included when one was sampled
    truncated: list[bool]  # True where the completion hit its token limit without stopping
    prompt_tokens: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def keyed_sampler(seed: int, temperature: float, top_p: float):
    """A sampler with its own random stream: a sequence's tokens then depend on its seed alone,
    not on which other sequences share its batch (resume and data parallelism rely on that)."""
    key = [mx.random.key(seed)]

    def sampler(logprobs_1V: mx.array) -> mx.array:
        if 0 < top_p < 1:
            logprobs_1V = apply_top_p(logprobs_1V, top_p)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs_1V * (1 / temperature), key=sub)

    return sampler


def sample(
    model: nn.Module,
    prompts: list[list[int]],
    max_tokens: list[int],
    stop_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seeds: list[int] | None = None,
) -> Rollout:
    """One completion per prompt (repeat a prompt to get several), in the order given. With
    `seeds`, sequence i samples from its own stream seeded by seeds[i]; without, from MLX's
    global random state (temperature 0 is greedy either way)."""
    samplers = None
    if seeds is not None and temperature > 0:
        samplers = [keyed_sampler(s, temperature, top_p) for s in seeds]
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
        uids = gen.insert(prompts, max_tokens, samplers=samplers)
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
