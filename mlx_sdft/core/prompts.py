"""The only place prompts are built: student and teacher contexts as chat-template token ids.

Student context: the prompt messages, rendered with `add_generation_prompt=True`.
Teacher context: the same conversation with the last user message replaced by the teacher
template filled with the question and the demonstration (system messages and tools kept).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from mlx_sdft.core.data import Example
from mlx_sdft.errors import InputError

_SLOT = re.compile(r"\{(question|demonstration|answer|feedback|followup)\}")


@dataclass(frozen=True)
class PromptPair:
    student_ids: list[int]
    teacher_ids: list[int]
    demo_ids: list[int]  # the demonstration as the assistant's turn (SFT targets), up to its end-of-turn token
    where: str


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """--system-prompt: a system message first, for a conversation that has none (a system or
    developer message of its own is kept as it is)."""
    if not system_prompt or messages[0]["role"] in ("system", "developer"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def apply_system_prompt(examples: list[Example], system_prompt: str | None) -> list[Example]:
    if not system_prompt:
        return examples
    return [dataclasses.replace(ex, prompt=with_system_prompt(ex.prompt, system_prompt)) for ex in examples]


def template_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template writes by itself when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM, …"), or None. Found by rendering one user turn
    with and without a marker system message: the injected text sits where the marker was."""
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    try:
        bare = render(tokenizer, user)
        marked = render(tokenizer, [{"role": "system", "content": marker}, *user])
    except Exception:  # no template (render says so later, where it matters), or one that refuses a system turn
        return None
    before, _, after = marked.partition(marker)
    if not (bare.startswith(before) and bare.endswith(after)) or len(bare) <= len(before) + len(after):
        return None
    return bare[len(before): len(bare) - len(after)] or None


def system_prompt_note(tokenizer, system_prompt: str | None) -> str | None:
    """One line on the system prompt the prompts get: --system-prompt's, or the template's own."""
    if system_prompt:
        return f"system prompt {system_prompt!r} (--system-prompt) for examples without a system message"
    injected = template_system_prompt(tokenizer)
    if injected:
        return f"the chat template adds the system prompt {injected!r} where an example has none (--system-prompt replaces it)"
    return None


def fill_template(template: str, question: str, demonstration: str, **context: str) -> str:
    """One pass over the slots, so a question that itself contains "{demonstration}" stays as written.
    `context` fills {answer}, {feedback}, {followup}; a slot without a value stays as written."""
    values = {"question": question, "demonstration": demonstration, **context}
    return _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def teacher_messages(example: Example, template: str) -> list[dict]:
    """`template` unless the example brings its own (a feedback or hindsight lesson)."""
    *history, last_user = example.prompt
    content = fill_template(example.teacher_template or template, last_user["content"], example.demonstration,
                            **(example.context or {}))
    return [*history, {**last_user, "content": content}]


def render(tokenizer, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = True) -> str:
    """The chat-template text; with add_generation_prompt, all that precedes the assistant's answer."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise InputError(
            "the tokenizer has no chat template: pass --chat-template (a Jinja string or a file), "
            'or add "chat_template" to the model\'s tokenizer_config.json'
        )
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS token; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def student_text(tokenizer, example: Example) -> str:
    return render(tokenizer, example.prompt, example.tools)


def teacher_text(tokenizer, example: Example, template: str) -> str:
    return render(tokenizer, teacher_messages(example, template), example.tools)


def demonstration_ids(tokenizer, example: Example, student_ids: list[int]) -> list[int]:
    """The demonstration's tokens as the chat template writes the assistant turn, through the first
    stop token (what sampling would produce). Falls back to demo + eos for templates that rewrite
    earlier turns once an answer follows (e.g. dropping reasoning)."""
    turn = {"role": "assistant", "content": example.demonstration}
    full = encode(tokenizer, render(tokenizer, [*example.prompt, turn], example.tools, add_generation_prompt=False))
    stops = set(tokenizer.eos_token_ids)
    if full[: len(student_ids)] == student_ids:
        ids = full[len(student_ids):]
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        return ids if end is None else ids[: end + 1]
    return encode(tokenizer, example.demonstration) + [min(stops)]


def encode_examples(tokenizer, examples: list[Example], template: str, max_seq_length: int) -> list[PromptPair]:
    """Token ids for both contexts; a prompt that leaves no room for a completion is an error, never cut."""
    pairs = []
    for ex in examples:
        student = encode(tokenizer, student_text(tokenizer, ex))
        teacher = encode(tokenizer, teacher_text(tokenizer, ex, template))
        for role, ids in (("prompt", student), ("teacher prompt", teacher)):
            if len(ids) >= max_seq_length:
                raise InputError(
                    f"{ex.where}: the {role} is {len(ids)} tokens, which leaves no room for a completion "
                    f"within --max-seq-length {max_seq_length}"
                )
        pairs.append(PromptPair(student, teacher, demonstration_ids(tokenizer, ex, student), ex.where))
    return pairs
