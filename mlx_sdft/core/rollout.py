"""On-policy sampling: the current student weights answer a batch of prompts.

`decode.decode` runs the loop for plain-KV-cache models, mlx-lm's `BatchGenerator`
(continuous batching) for the rest, and for batches larger than --batch-size. Unlike
`batch_generate`, the stop token is kept: the teacher scores it too, so the student learns
when to stop. LoRA adapters are fused into the weights while sampling (`fused_adapters`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.lora import LoRALinear

from mlx_sdft.core import decode
from mlx_sdft.core.scoring import prefill_body


@dataclass
class Rollout:
    completions: list[list[int]]  # sampled token ids, the stop token included when one was sampled
    truncated: list[bool]  # True where the completion hit its token limit without stopping
    prompt_tokens: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def keyed_sampler(seed: int, temperature: float, top_p: float):
    """A BatchGenerator sampler with its own random stream (`decode.draw` on one row), so a
    sequence's tokens depend on its seed alone, not on which other sequences share its batch
    (resume and data parallelism rely on that), and equal what `decode.decode` draws."""
    key = [decode.row_keys([seed])]

    def sampler(logprobs_1V: mx.array) -> mx.array:
        token_1, key[0] = decode.draw(logprobs_1V.astype(mx.float32), key[0], temperature, top_p)
        return token_1

    return sampler


class FusedLinear(nn.Module):
    """A LoRA linear with its adapter added into a copy of the base weight: W + s·BᵀAᵀ.
    Not LoRALinear.fuse(): it builds an nn.Linear, whose random initialisation would draw from
    MLX's global random state (the stream of LoRA dropout) at every rollout."""

    def __init__(self, lora: LoRALinear):
        super().__init__()
        base = lora.linear
        self.weight = base.weight + ((lora.scale * lora.lora_b.T) @ lora.lora_a.T).astype(
            base.weight.dtype
        )
        if "bias" in base:
            self.bias = base.bias
        self.freeze()  # a sampling-time copy: nothing may train it

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight.T)
        return x @ self.weight.T


def fusable(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """LoRA linears whose adapter can be fused exactly: not over quantized weights, where
    fusing would requantize and so sample from a slightly different policy."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m) is LoRALinear and not isinstance(m.linear, nn.QuantizedLinear)
    ]


def fused_bytes(model: nn.Module) -> int:
    return sum(m.linear.weight.nbytes for _, m in fusable(model))


@contextmanager
def fused_adapters(model: nn.Module):
    """While the block runs, every fusable LoRA linear is one matmul with fused weights
    instead of three ops: a decoded token then costs the base model's kernels only. The copy
    (fused_bytes) is freed on exit; the adapters themselves are untouched."""
    lora = fusable(model)
    if not lora:
        yield
        return
    model.update_modules(tree_unflatten([(name, FusedLinear(m)) for name, m in lora]))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(lora))


def shared_prefill(
    model: nn.Module, prompts: list[list[int]]
) -> tuple[list[list[int]], list | None]:
    """When prompts repeat (--num-generations > 1), prefill each distinct prompt once: returns
    the last token of every prompt and a KV cache per prompt holding the rest, one cache object
    shared by all copies (BatchGenerator merges caches into its batch by copying them, never in
    place). (prompts, None) when nothing repeats."""
    distinct, rows = decode.distinct_rows(prompts)
    if len(distinct) == len(prompts) or min(map(len, prompts)) < 2:
        return prompts, None
    body, caches = prefill_body(model), [make_prompt_cache(model) for _ in distinct]
    for p, cache in zip(distinct, caches):
        body(mx.array([p[:-1]]), cache=cache)
        mx.eval([c.state for c in cache])
    return [p[-1:] for p in prompts], [caches[r] for r in rows]


def sample(
    model: nn.Module,
    prompts: list[list[int]],
    max_tokens: list[int],
    stop_ids: list[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seeds: list[int] | None = None,
    fuse: bool = True,
) -> Rollout:
    """One completion per prompt (repeat a prompt to get several), in the order given. With
    `seeds`, sequence i samples from its own stream seeded by seeds[i]; without, from MLX's
    global random state (temperature 0 is greedy either way). `fuse` samples with the LoRA
    adapters fused into a copy of their weights (`fused_adapters`): faster, same policy."""
    was_training = model.training
    model.eval()  # no LoRA dropout while sampling (fusing also relies on it)
    try:
        with fused_adapters(model) if fuse else nullcontext():
            if decode.supported(model) and len(prompts) <= batch_size:
                completions, truncated = decode.decode(
                    model, prompts, max_tokens, stop_ids, temperature, top_p, seeds
                )
                return Rollout(completions, truncated, sum(len(p) for p in prompts))
            return _generate(
                model, prompts, max_tokens, stop_ids, temperature, top_p, batch_size, seeds
            )
    finally:
        model.train(was_training)


def _generate(
    model, prompts, max_tokens, stop_ids, temperature, top_p, batch_size, seeds
) -> Rollout:
    """The same sampling through mlx-lm's BatchGenerator, for caches `decode` does not handle."""
    samplers = None
    if seeds is not None and temperature > 0:
        samplers = [keyed_sampler(s, temperature, top_p) for s in seeds]
    gen = BatchGenerator(
        model,
        stop_tokens=[[t] for t in stop_ids],
        sampler=make_sampler(temp=temperature, top_p=top_p),
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        inputs, caches = shared_prefill(model, prompts)
        uids = gen.insert(inputs, max_tokens, caches=caches, samplers=samplers)
        tokens = {uid: [] for uid in uids}
        truncated = {}
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    truncated[r.uid] = r.finish_reason == "length"
    finally:
        gen.close()
    return Rollout(
        completions=[tokens[u] for u in uids],
        truncated=[truncated[u] for u in uids],
        prompt_tokens=sum(len(p) for p in prompts),
    )
