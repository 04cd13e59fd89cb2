"""The decode loop of on-policy sampling, for models whose cache is a plain KVCache per layer
(llama, qwen, mistral, phi3, …): per token one batched model call on mlx-lm's growing
`BatchKVCache` and one compiled, vectorised sampling step; evaluated one step ahead, with a few
lines of Python per step. The prefill runs each distinct prompt once, and the prompts' common
beginning once per batch (`_prefill`).

`rollout.sample` uses it where `supported`, and mlx-lm's BatchGenerator otherwise (sliding
window and recurrent caches). Both draw the same tokens: `draw` is the one sampling function.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache
from mlx_lm.sample_utils import apply_top_p

from mlx_sdft.core.scoring import prefill_body

_split_rows = mx.vmap(mx.random.split)
_categorical_rows = mx.vmap(lambda key_2, logits_V: mx.random.categorical(logits_V, key=key_2))


def row_keys(seeds: list[int]) -> mx.array:
    """keys_B2: one random stream per sequence."""
    return mx.stack([mx.random.key(s) for s in seeds])


def draw(logprobs_BV: mx.array, keys_B2: mx.array | None, temperature: float, top_p: float):
    """Next tokens from normalised log-probabilities → (tokens_B, next keys_B2). Row b draws
    with its own key, so its tokens depend on its seed only, not on its batch; without keys,
    from MLX's global random state. Temperature 0 is greedy."""
    if temperature == 0:
        return mx.argmax(logprobs_BV, axis=-1), keys_B2
    if 0 < top_p < 1:
        logprobs_BV = apply_top_p(logprobs_BV, top_p)
    logits_BV = logprobs_BV * (1 / temperature)
    if keys_B2 is None:
        return mx.random.categorical(logits_BV), None
    split_B22 = _split_rows(keys_B2)
    return _categorical_rows(split_B22[:, 1], logits_BV), split_B22[:, 0]


def next_tokens(logits_BV: mx.array, keys_B2: mx.array | None, temperature: float, top_p: float):
    """One decode step's sampling: the model's last logits normalised in float32, then `draw`."""
    logits_BV = logits_BV.astype(mx.float32)
    return draw(
        logits_BV - mx.logsumexp(logits_BV, axis=-1, keepdims=True), keys_B2, temperature, top_p
    )


# Compiled once per batch shape (a shrinking batch retraces): one fused graph instead of ~12 small
# operations per token.
next_tokens_compiled = mx.compile(next_tokens)


class DecodeCache(BatchKVCache):
    """A BatchKVCache whose decode steps need no attention mask while no row is left-padded
    (batch 1, copies of one prompt, prompts of one length): one query attends every key, so the
    mask would be all true. mlx-lm's KVCache does the same for a single sequence."""

    def __init__(self, left_padding: list[int]):
        super().__init__(left_padding)
        self.padded = any(left_padding)

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        if N == 1 and not self.padded:
            return None
        return super().make_mask(N, return_array=return_array, **kwargs)

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self.padded = any(self.left_padding.tolist())


def supported(model: nn.Module) -> bool:
    return all(type(c) is KVCache for c in make_prompt_cache(model))


def distinct_rows(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Each distinct prompt once, and for every prompt the index of its distinct copy."""
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    return [list(p) for p in distinct], [distinct.index(tuple(p)) for p in prompts]


def common_length(prompts: list[list[int]]) -> int:
    """P: how many first tokens all prompts share, each keeping ≥ 1 of its own (its last token
    predicts what follows: scoring reads its hidden state, sampling feeds it to the first decode
    step); 0 for one prompt, or when P < 2."""
    P = min(map(len, prompts)) - 1
    if P < 2 or len(prompts) < 2:  # also an empty prompt (P = -1 would slice from the end)
        return 0
    for p in prompts[1:]:
        P = next((i for i, (a, b) in enumerate(zip(prompts[0][:P], p)) if a != b), P)
    return P if P >= 2 else 0


def _fill(body: nn.Module, inputs_BL: mx.array, cache: list[BatchKVCache], step: int) -> None:
    for start in range(0, inputs_BL.shape[1], step):
        body(inputs_BL[:, start : start + step], cache=cache)
        mx.eval([c.state for c in cache])


def _prefill(model: nn.Module, prompts: list[list[int]], step: int) -> list[DecodeCache]:
    """A left-padded batch cache holding every prompt but its last token (the first decode
    input), filled by `prefill_body`. The prompts' common prefix (`common_length`, the chat
    template's header and system prompt) runs once at batch 1; every row continues from a copy of
    it with its own remainder, right-padded (causal attention never reads the padding after a
    token), and mlx-lm's `finalize` rolls that padding to the left: the decode steps see the
    layout of a prefill that shares nothing, and equal its values to rounding."""
    lengths = [len(p) - 1 for p in prompts]
    width, P, body = max(lengths), common_length(prompts), prefill_body(model)
    pad = [width - n for n in lengths]
    if not P:
        cache = [DecodeCache(pad) for _ in make_prompt_cache(model)]
        _fill(body, mx.array([[0] * n + p[:-1] for p, n in zip(prompts, pad)]), cache, step)
        return cache
    cache = [DecodeCache([0]) for _ in make_prompt_cache(model)]
    _fill(body, mx.array([prompts[0][:P]]), cache, step)
    for c in cache:
        c.filter(mx.zeros(len(prompts), mx.int32))  # the prefix's keys and values, one copy per row
        c.prepare(right_padding=pad)
    _fill(body, mx.array([p[P:-1] + [0] * n for p, n in zip(prompts, pad)]), cache, step)
    for c in cache:
        c.finalize()
        c.padded = any(pad)
    return cache


def decode(
    model: nn.Module,
    prompts: list[list[int]],
    max_tokens: list[int],
    stop_ids: list[int],
    temperature: float,
    top_p: float,
    seeds: list[int] | None,
    prefill_step: int = 512,
) -> tuple[list[list[int]], list[bool]]:
    """(completions, truncated) for each prompt, the stop token kept. Copies of a prompt share
    one prefill, and all prompts their common prefix; finished rows leave the batch."""
    distinct, rows = distinct_rows(prompts)
    cache = _prefill(model, distinct, prefill_step)
    if rows != list(range(len(distinct))):
        for c in cache:
            c.filter(rows)  # copies of a prompt become rows of their own
    keys = row_keys(seeds) if seeds is not None and temperature > 0 else None
    # Keyed draws only: unkeyed ones read MLX's global random state, which a compiled graph would freeze.
    sampling = next_tokens_compiled if keys is not None else next_tokens

    def step(tokens_B: mx.array, keys_B2: mx.array | None):
        return sampling(
            model(tokens_B[:, None], cache=cache)[:, -1, :], keys_B2, temperature, top_p
        )

    stops = set(stop_ids)
    completions, truncated = [[] for _ in prompts], [True] * len(prompts)
    batch = list(range(len(prompts)))  # the sequence each batch row samples for, None once it ended
    tokens, keys = step(
        mx.array([p[-1] for p in prompts], mx.uint32), keys
    )  # uint32, as drawn tokens are
    mx.async_eval(tokens, keys)
    while live := [(row, seq) for row, seq in enumerate(batch) if seq is not None]:
        # Start the next step before reading this one, so the device never waits for Python;
        # unless every row ends here.
        last = all(len(completions[seq]) + 1 >= max_tokens[seq] for _, seq in live)
        ahead = (tokens, keys) if last else step(tokens, keys)
        mx.async_eval(*ahead)
        drawn = tokens.tolist()
        for row, seq in live:
            completions[seq].append(drawn[row])
            if drawn[row] in stops:
                truncated[seq] = False
            if drawn[row] in stops or len(completions[seq]) >= max_tokens[seq]:
                batch[row] = None
        tokens, keys = ahead
        keep = [row for row, seq in enumerate(batch) if seq is not None]
        if keep and len(keep) < len(batch):  # a smaller batch costs nothing to set up
            index = mx.array(keep)
            for c in cache:
                c.filter(index)
            tokens, keys = tokens[index], None if keys is None else keys[index]
            batch = [batch[row] for row in keep]
    return completions, truncated
