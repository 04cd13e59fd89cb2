"""The compiled decode step (issue 18): one `mx.compile`d graph per token for the model call
and the sampling, instead of thousands of small operations dispatched one by one.

A graph compiles once per shape, so the KV cache must keep one: `StaticCache` holds each
layer's keys and values in a buffer of fixed length (the prompt width plus the longest
completion budget, rounded up to `STEP`), writes each new token at an array index and lets
attention see the whole buffer under a mask of the filled, unpadded slots. RoPE positions stay
the per-row array offsets of mlx-lm's `BatchKVCache`, so each row's keys, queries and attended
values are those of the plain loop. The model's weights are inputs of the compiled graph, not
constants: the fused LoRA weights change at every rollout and need no retrace.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache

STEP = 64  # buffer lengths are multiples of it: few shapes (and traces), few idle slots to attend

# Model types whose attention reads the cache only through `offset`, `update_and_fetch` and
# `make_mask` (via create_attention_mask), which is all `StaticCache` provides.
MODEL_TYPES = {"llama", "qwen2", "qwen3", "olmo2", "phi3", "smollm3"}

# A finished row stays in the compiled batch (its tokens are ignored) until at most this
# share of the rows is still sampling; then the batch shrinks and the step retraces.
SHRINK_AT = 0.5


def supported(model: nn.Module) -> bool:
    return type(model).__module__.rsplit(".", 1)[-1] in MODEL_TYPES


class StaticCache:
    """One layer's cache for a decode step: keys_BHSD and values_BHSD of fixed length S,
    slot `idx` (a 0-d array, shared by all rows) the next to write; row b's tokens fill slots
    left_padding_B[b] .. idx - 1 and sit at positions offset_B[b] - (idx - slot)."""

    def __init__(self, keys_BHSD: mx.array, values_BHSD: mx.array, idx: mx.array,
                 offset_B: mx.array, left_padding_B: mx.array):
        self.keys, self.values = keys_BHSD, values_BHSD
        self.idx, self.offset, self.left_padding = idx, offset_B, left_padding_B

    def update_and_fetch(self, keys_BH1D: mx.array, values_BH1D: mx.array):
        start = self.idx.reshape(1)
        self.keys = mx.slice_update(self.keys, keys_BH1D, start, axes=(2,))
        self.values = mx.slice_update(self.values, values_BH1D, start, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, **kwargs) -> mx.array:
        """mask_B11S: the slots holding this row's tokens, the one being written included
        (`BatchKVCache.make_mask` over the whole buffer). Decode steps only (N = 1)."""
        if N != 1 or kwargs.get("window_size"):
            raise ValueError("StaticCache serves single-token decode steps without a window")
        slots_S = mx.arange(self.keys.shape[2])
        mask_BS = (slots_S[None] <= self.idx) & (slots_S[None] >= self.left_padding[:, None])
        return mask_BS[:, None, None, :]


def _step(model: nn.Module, sampling: Callable, tokens_B, keys_B2, idx, offset_B, left_padding_B,
          ks, vs, temperature: float, top_p: float):
    cache = [StaticCache(k, v, idx, offset_B, left_padding_B) for k, v in zip(ks, vs)]
    tokens_B, keys_B2 = sampling(model(tokens_B[:, None], cache=cache)[:, -1, :], keys_B2, temperature, top_p)
    return tokens_B, keys_B2, idx + 1, offset_B + 1, [c.keys for c in cache], [c.values for c in cache]


_compiled: dict[tuple[int, Callable], Callable] = {}  # for one model at a time: it holds the model


def compiled_step(model: nn.Module, sampling: Callable) -> Callable:
    """The decode step of `model` (its call, then `sampling` of the last logits) compiled with
    the model's weights as inputs, read at every call: fusing new adapters into them needs no
    retrace. Kept for the last model asked for (another one's replace it, which frees that
    model and its traces); traced once per batch size, buffer length, temperature and top-p."""
    if any(key[0] != id(model) for key in _compiled):
        _compiled.clear()
    if (id(model), sampling) not in _compiled:
        _compiled[(id(model), sampling)] = mx.compile(lambda *a: _step(model, sampling, *a), inputs=model)
    return _compiled[(id(model), sampling)]


class CompiledDecode:
    """The decode loop's step and filter over a `StaticCache` per layer, filled from the
    prefill's `BatchKVCache`s: `step(tokens_B, keys_B2)` appends the tokens and returns the
    next ones, `shrink(n, batch)` whether to drop finished rows now, `filter(rows)` drops them."""

    def __init__(self, model: nn.Module, prefilled: list[BatchKVCache], max_tokens: int,
                 sampling: Callable, temperature: float, top_p: float):
        first = prefilled[0]
        width = first._idx
        length = -(-(width + max_tokens) // STEP) * STEP  # every slot the loop can write
        pad = [(0, 0), (0, 0), (0, length - width), (0, 0)]
        self.ks = [mx.pad(c.keys[..., :width, :], pad) for c in prefilled]
        self.vs = [mx.pad(c.values[..., :width, :], pad) for c in prefilled]
        self.idx, self.offset, self.left_padding = mx.array(width, mx.int32), first.offset, first.left_padding
        self.fn, self.sampling_args = compiled_step(model, sampling), (temperature, top_p)

    @staticmethod
    def usable(prefilled: list[BatchKVCache]) -> bool:
        return prefilled[0].keys is not None  # prompts of one token: nothing to shape a buffer by

    def step(self, tokens_B: mx.array, keys_B2: mx.array | None):
        # Greedy steps carry no keys; the compiled graph wants an array in their place.
        keys_in = mx.zeros((tokens_B.shape[0], 2), mx.uint32) if keys_B2 is None else keys_B2
        tokens_B, keys_out, self.idx, self.offset, self.ks, self.vs = self.fn(
            tokens_B, keys_in, self.idx, self.offset, self.left_padding, self.ks, self.vs, *self.sampling_args)
        return tokens_B, None if keys_B2 is None else keys_out

    @staticmethod
    def shrink(active: int, batch: int) -> bool:
        return active <= SHRINK_AT * batch

    def filter(self, rows: mx.array):
        self.ks, self.vs = [k[rows] for k in self.ks], [v[rows] for v in self.vs]
        self.offset, self.left_padding = self.offset[rows], self.left_padding[rows]
