"""Scoring several continuations of prompts that share a beginning, each shared part computed once.

An SDFT micro-batch scores every prompt more than once: the student's prompt under each of its
--num-generations completions and under its demonstration (the --sft-weight term), the teacher's
prompt under each completion; and different prompts begin alike (the chat template's system prompt
and the user turn's opening). `completion_hidden` runs the distinct prompts' longest common prefix
through the model once (batch 1), each distinct prompt's remainder once (left-padded, as mlx-lm
batches ragged prompts, the padding between the common prefix and the remainder), and every
continuation on top of a copy of its prompt's keys and values. The result equals
`scoring.completion_hidden` to rounding, values and gradients alike: the cache is built by
concatenation, never written in place, so the gradient of the LoRA weights flows through the
prompt's keys and values as in the full pass, and copies of one prompt share no array
(tests/core/test_prefix.py).

Used where it is exact: models whose cache is a plain KVCache per layer (`decode.supported`)
and whose LM head splits off (`scoring.lm_head`); the others, and --grad-checkpoint (mx.checkpoint
cannot carry a cache through a block), take the full pass over every row.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from mlx_sdft.core import decode
from mlx_sdft.core.scoring import (
    completion_hidden as full_hidden,
    completion_logits,
    lm_head,
    pad_rows,
    prefill_body,
)


class PrefixCache(BatchKVCache):
    """mlx-lm's left-padded batch cache (per-row RoPE offsets, the padding masked) whose keys and
    values grow by concatenation: differentiable, and `rows` makes copies that share nothing.
    Row b's left_padding[b] padded slots start at slot `start` (after a common prefix of `start`
    slots; 0: mlx-lm's left padding), hidden from every query."""

    def __init__(self, left_padding: list[int], start: int = 0):
        super().__init__(left_padding)
        self.start = start

    def update_and_fetch(self, keys_BHLD: mx.array, values_BHLD: mx.array):
        L = keys_BHLD.shape[2]
        if self.keys is not None:
            keys_BHLD = mx.concatenate([self.keys, keys_BHLD], axis=2)
            values_BHLD = mx.concatenate([self.values, values_BHLD], axis=2)
        self.keys, self.values, self.offset, self._idx = (
            keys_BHLD,
            values_BHLD,
            self.offset + L,
            self._idx + L,
        )
        return keys_BHLD, values_BHLD

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mx.array:
        """The causal mask with each row's padded slots hidden, and each query also seeing its own
        key: a padded query would otherwise see none (with start 0), and a backend whose softmax turns
        an all-masked row into 0/0 would put NaN into the backward pass. Real queries already see
        their own key. With start 0 this is mlx-lm's left-padded mask plus that diagonal."""
        keys_K = mx.arange(self._idx + N)
        gap_B111K = ((self.start <= keys_K) & (keys_K < self.start + self.left_padding[:, None]))[
            :, None, None
        ]
        mask = create_causal_mask(N, offset=self._idx, **kwargs) & ~gap_B111K
        return mask | (mx.arange(self._idx, self._idx + N)[:, None] == keys_K[None])

    def rows(self, index_B: mx.array) -> PrefixCache:
        """A new cache holding row index_B[b] of this one as its row b."""
        copy = PrefixCache([0] * index_B.shape[0], self.start)
        copy.keys, copy.values = self.keys[index_B], self.values[index_B]
        copy.offset, copy.left_padding, copy._idx = (
            self.offset[index_B],
            self.left_padding[index_B],
            self._idx,
        )
        return copy


def shares(model: nn.Module) -> bool:
    """Whether this model's prompts can be scored once for several continuations."""
    return lm_head(model) is not None and decode.supported(model)


def completion_hidden(
    model: nn.Module, prompts: list[list[int]], continuations: list[list[int]], share: bool = True
) -> mx.array:
    """hidden_BTD as `scoring.completion_hidden` (row i: prompts[i] then continuations[i]; [i, j] is
    what `lm_head` turns into the prediction of continuations[i][j]), the prompts' common prefix run
    once and each distinct prompt once when prompts repeat or share a prefix (`decode.common_length`), the
    model `shares` and `share` is on; else the full pass over every row."""
    distinct, rows = decode.distinct_rows(prompts)
    P = decode.common_length(distinct)
    if not share or (len(distinct) == len(prompts) and not P) or not shares(model):
        return full_hidden(model, prompts, continuations)
    body, width = prefill_body(model), max(map(len, distinct)) - P
    pad = [width - len(p) + P for p in distinct]
    cache = [PrefixCache(pad, P) for _ in make_prompt_cache(model)]
    if P:
        common = [PrefixCache([0]) for _ in cache]
        body(mx.array([distinct[0][:P]]), cache=common)
        for c, one in zip(
            cache, common
        ):  # every row starts with the common keys, RoPE resuming at P
            shape = (len(distinct),) + one.keys.shape[1:]
            c.keys, c.values = mx.broadcast_to(one.keys, shape), mx.broadcast_to(one.values, shape)
            c.offset, c._idx = c.offset + P, P
    prompt_RWD = body(mx.array([[0] * n + p[P:] for n, p in zip(pad, distinct)]), cache=cache)
    index_B, T = mx.array(rows), max(map(len, continuations))
    # Left padding puts every prompt's last token in the last slot: it predicts continuation token 0.
    last_B1D = prompt_RWD[index_B, -1:]
    if T <= 1:
        return last_B1D[:, :T]
    # The last continuation token is never an input: nothing after it is scored.
    rest_BTD = body(
        pad_rows([c[:-1] for c in continuations]), cache=[c.rows(index_B) for c in cache]
    )
    return mx.concatenate([last_B1D, rest_BTD], axis=1)


def grouped(
    model: nn.Module,
    groups: list[tuple[list[list[int]], list[list[int]]]],
    hidden: bool = False,
    share: bool = True,
) -> list[mx.array | None]:
    """For each group (prompts, continuations), its logits_BTV (hidden_BTD with `hidden`, for models
    whose head splits), T its own longest continuation, as `scoring.completion_logits` would give;
    None for an empty group. The rows of all groups share one prefill per distinct prompt and one of
    their common prefix (`completion_hidden`); without sharing each group takes its own full pass."""
    head, kept = lm_head(model), [g for g in groups if g[0]]
    if not kept:  # nothing to score: no pass at all
        return [None] * len(groups)
    if not (share and shares(model)):
        scored = iter([(full_hidden if hidden else completion_logits)(model, *g) for g in kept])
        return [next(scored) if g[0] else None for g in groups]
    hidden_BTD = completion_hidden(
        model, [p for g in kept for p in g[0]], [c for g in kept for c in g[1]]
    )
    out, start = [], 0
    for prompts, continuations in groups:
        if not prompts:
            out.append(None)
            continue
        part_BTD = hidden_BTD[start : start + len(prompts), : max(map(len, continuations))]
        out.append(part_BTD if hidden else head(part_BTD))
        start += len(prompts)
    return out
