"""Completion-aligned logits: one function scores a batch for the student and the teacher alike.

Row i is prompt_i + completion_i. The logit at absolute position t predicts token t+1, so
completion token j of row i is scored at position len(prompt_i) - 1 + j. Rows are right
padded: with causal attention, padding after the real tokens cannot change them.
`prefix.py` gives the same values with each repeated prompt, and the prompts' common prefix, run once.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Model classes whose __call__ is exactly `head(backbone(x))`, so the LM head can run on the
# completion positions only; long teacher prompts then cost no [P, V] logits.
_HEAD_SPLIT = {"llama", "qwen2", "qwen3", "mistral", "gemma3_text", "olmo2", "smollm3"}


def completion_mask(lengths: list[int]) -> mx.array:
    """mask_BT: 1 for real completion tokens, 0 for right padding."""
    T = max(lengths)
    return (mx.arange(T)[None, :] < mx.array(lengths)[:, None]).astype(mx.float32)


def pad_rows(rows: list[list[int]], pad: int = 0) -> mx.array:
    L = max(len(r) for r in rows)
    return mx.array([r + [pad] * (L - len(r)) for r in rows], dtype=mx.int32)


def head_splits(model_type: str) -> bool:
    """Whether the LM head of this model type can run apart from its backbone."""
    return model_type in _HEAD_SPLIT


def _split_head(model: nn.Module):
    if not head_splits(type(model).__module__.rsplit(".", 1)[-1]):
        return None
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    return model.model, head


def lm_head(model: nn.Module):
    """The LM head as a function hidden_BTD → logits_BTV, or None when it cannot be split off."""
    split = _split_head(model)
    return split[1] if split else None


def prefill_body(model: nn.Module) -> nn.Module:
    """What to run over a prompt whose logits are never read (filling a KV cache): the body
    alone where the LM head splits off, else the whole model."""
    split = _split_head(model)
    return split[0] if split else model


def _inputs(prompts: list[list[int]], completions: list[list[int]]) -> tuple[mx.array, mx.array]:
    """inputs_BL and positions_BT: the input slot whose output predicts each completion token."""
    T = max(len(c) for c in completions)
    # The last completion token is never an input: nothing after it is scored.
    inputs_BL = pad_rows([p + c[:-1] for p, c in zip(prompts, completions)])
    start_B = mx.array([len(p) - 1 for p in prompts])
    positions_BT = start_B[:, None] + mx.arange(T)[None, :]
    return inputs_BL, mx.minimum(
        positions_BT, inputs_BL.shape[1] - 1
    )  # padded slots read any valid row


def completion_hidden(
    model: nn.Module, prompts: list[list[int]], completions: list[list[int]]
) -> mx.array:
    """hidden_BTD: the final hidden state that `lm_head` turns into the prediction of
    completions[i][j]; for models where `lm_head(model)` is not None."""
    backbone, _ = _split_head(model)
    inputs_BL, positions_BT = _inputs(prompts, completions)
    return mx.take_along_axis(backbone(inputs_BL), positions_BT[..., None], axis=1)


def completion_logits(
    model: nn.Module, prompts: list[list[int]], completions: list[list[int]]
) -> mx.array:
    """logits_BTV where [i, j] is the model's prediction of completions[i][j]; rows past the
    completion's length are padding (see `completion_mask`)."""
    head = lm_head(model)
    if head is not None:
        return head(completion_hidden(model, prompts, completions))
    inputs_BL, positions_BT = _inputs(prompts, completions)
    return mx.take_along_axis(model(inputs_BL), positions_BT[..., None], axis=1)
