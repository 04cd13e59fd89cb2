"""The chat template as functions: `render` (the one call of apply_chat_template), `encode`, and what
one rendered assistant turn tells: where a turn ends (`turn_end_text`, `turn_end_id`) and every id
that ends an answer (`stop_ids`).

Below core and formats, which both need it: opening a tokenizer adds the stop set to it
(formats/models.py), building prompts renders and ends targets at the turn's end (core/prompts.py).
"""

from __future__ import annotations

from mlx_sdft.errors import InputError

MARK = (
    "ANSWER-7f3a"  # assistant content no template changes, to find what a template writes after it
)


def render(
    tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True
) -> str:
    """The chat-template text; with add_generation_prompt, all that precedes the assistant's answer."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise InputError(
            "the tokenizer has no chat template: pass --chat-template (a Jinja string or a file), "
            'or add "chat_template" to the model\'s tokenizer_config.json'
        )
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
    )


def encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS token; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _special_ids(tokenizer) -> set[int]:
    """Ids of added/special tokens: only these can end a turn (a plain newline must not)."""
    return set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(
        getattr(tokenizer, "all_special_ids", [])
    )


def turn_end_text(tokenizer) -> str | None:
    """What the chat template writes right after an assistant's content (ChatML "<|im_end|>\\n",
    Llama-3 "<|eot_id|>", Gemma "<end_of_turn>\\n"), found by rendering one assistant turn.
    None without a chat template or when the template cannot render one."""
    if not getattr(tokenizer, "has_chat_template", False):
        return None
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": MARK}]
    try:
        text = render(tokenizer, turn, add_generation_prompt=False)
    except (
        Exception
    ):  # a template that refuses this shape (e.g. requires a system turn) adds no stop
        return None
    return text[text.rindex(MARK) + len(MARK) :] if MARK in text else None


def turn_end_id(tokenizer) -> int | None:
    """The special token the template writes after assistant content (its end-of-turn), if any."""
    tail = turn_end_text(tokenizer)
    ids = encode(tokenizer, tail) if tail else []
    special = _special_ids(tokenizer)
    return next((t for t in ids if t in special), None)


def stop_ids(
    tokenizer, model_config: dict | None = None, generation_config: dict | None = None
) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos, config.json's and generation_config.json's
    eos_token_id, and the template's end-of-turn token. Sampling, targets, eval, check and
    generate all stop on this one set, so a model whose turns end in another token than its eos
    (ChatML <|im_end|> under an <|endoftext|> eos, Llama-3 <|eot_id|>, Gemma <end_of_turn>)
    stops where its answers end."""
    ids = set(tokenizer.eos_token_ids) | set(_ids(getattr(tokenizer, "eos_token_id", None)))
    for config in (model_config or {}, generation_config or {}):
        ids |= set(_ids(config.get("eos_token_id")))
    end = turn_end_id(tokenizer)
    return sorted(ids | ({end} if end is not None else set()))
