"""The only place prompts are built: student and teacher contexts as chat-template token ids.

Student context: the prompt messages, rendered with `add_generation_prompt=True`.
Teacher context: the same conversation with the last user message replaced by the teacher
template filled with the question and the demonstration (system messages and tools kept).
Targets: the text the template writes after the student prompt, tokenized on its own and ended
at the end-of-turn token (`target_text`). Rendering, the end of a turn and the stop set are
chat_template.py's (formats/models.py needs them too, to open a tokenizer).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from mlx_sdft.chat_template import MARK as _MARK
from mlx_sdft.chat_template import encode, render, turn_end_id, turn_end_text
from mlx_sdft.core.data import Example
from mlx_sdft.errors import InputError

_SLOT = re.compile(r"\{(question|demonstration|answer|feedback|followup)\}")


@dataclass(frozen=True)
class PromptPair:
    student_ids: list[int]
    teacher_ids: list[int]
    demo_ids: list[
        int
    ]  # the demonstration as the assistant's turn (SFT targets), up to its end-of-turn token
    where: str
    # False for a lesson whose teacher sees a context (feedback) instead: demo_ids is then an empty turn,
    # which neither the SFT term nor the completion budget may take for a demonstration.
    demonstrated: bool = True


def describe_stops(tokenizer) -> str:
    """ "<|im_end|> (2), <|endoftext|> (0)": the stop set for the startup panel."""
    return ", ".join(
        f"{tokenizer.convert_ids_to_tokens(t)} ({t})" for t in sorted(tokenizer.eos_token_ids)
    )


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """--system-prompt: a system message first, for a conversation that has none (a system or
    developer message of its own is kept as it is)."""
    if not system_prompt or messages[0]["role"] in ("system", "developer"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def apply_system_prompt(examples: list[Example], system_prompt: str | None) -> list[Example]:
    if not system_prompt:
        return examples
    return [
        dataclasses.replace(ex, prompt=with_system_prompt(ex.prompt, system_prompt))
        for ex in examples
    ]


def template_system_prompt(tokenizer) -> str | None:
    """The system prompt the chat template writes by itself when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM, …"), or None. Found by rendering one user turn
    with and without a marker system message: the injected text sits where the marker was."""
    marker, user = "\x00SYSTEM\x00", [{"role": "user", "content": "\x00USER\x00"}]
    try:
        bare = render(tokenizer, user)
        marked = render(tokenizer, [{"role": "system", "content": marker}, *user])
    except (
        Exception
    ):  # no template (render says so later, where it matters), or one that refuses a system turn
        return None
    before, _, after = marked.partition(marker)
    if not (bare.startswith(before) and bare.endswith(after)) or len(bare) <= len(before) + len(
        after
    ):
        return None
    return bare[len(before) : len(bare) - len(after)] or None


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


def with_rules(
    messages: list[dict], rules: str | None, default_system: str | None = None
) -> list[dict]:
    """The conversation with `rules` added to its system message: after the conversation's own
    system message, else after `default_system` (the one the chat template writes by itself), so
    the rules add to the model's usual context instead of replacing it."""
    if not rules:
        return messages
    if messages[0]["role"] in ("system", "developer"):
        first = messages[0]
        return [
            {**first, "content": f"{first.get('content') or ''}\n\n{rules}".lstrip("\n")},
            *messages[1:],
        ]
    system = f"{default_system}\n\n{rules}" if default_system else rules
    return [{"role": "system", "content": system}, *messages]


def teacher_messages(
    example: Example, template: str, default_system: str | None = None
) -> list[dict]:
    """`template` unless the example brings its own (a feedback or hindsight lesson); the example's
    `teacher_system` (rules) added to the system message, after `default_system` when it has none.
    A demonstration in the example's context is shown to the teacher in place of its own (a lesson's
    prompt reworded: the teacher sees the lesson's demonstration, the SFT term has none to train on)."""
    *history, last_user = example.prompt
    slots = {"demonstration": example.demonstration, **(example.context or {})}
    content = fill_template(example.teacher_template or template, last_user["content"], **slots)
    return with_rules(
        [*history, {**last_user, "content": content}], example.teacher_system, default_system
    )


def special_texts(tokenizer) -> dict[str, list[str]]:
    """The texts of the tokenizer's special (control) tokens, by their first two characters. Rendered
    prompts are encoded with special-token parsing on (the template's own "<|im_start|>" must become
    its token), so one of these typed inside a message would become that control token."""
    cached = getattr(tokenizer, "_mlx_sdft_specials", None)
    if cached is not None:
        return cached
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {t.content for t in added.values() if getattr(t, "special", False)}
    texts |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    groups: dict[str, list[str]] = {}
    for text in sorted((t for t in texts if t), key=len, reverse=True):
        groups.setdefault(text[:2], []).append(text)
    try:
        tokenizer._mlx_sdft_specials = groups
    except AttributeError:  # a tokenizer that takes no attributes: found again next time
        pass
    return groups


def special_text_in(tokenizer, value) -> str | None:
    """The first special token's text found in `value` (a string, or every string and key of a
    list or dict, such as messages with tool calls), else None."""
    if isinstance(value, str):
        for prefix, texts in special_texts(tokenizer).items():
            at = value.find(prefix)
            while at >= 0:
                found = next((t for t in texts if value.startswith(t, at)), None)
                if found is not None:
                    return found
                at = value.find(prefix, at + 1)
        return None
    items = (
        [*value.keys(), *value.values()]
        if isinstance(value, dict)
        else value
        if isinstance(value, list)
        else []
    )
    return next(
        (found for item in items if (found := special_text_in(tokenizer, item)) is not None), None
    )


def check_literal(tokenizer, example: Example) -> None:
    """InputError when a text of the example holds a special token's text: encoded with the rendered
    prompt it would become that control token (a demonstration with "<|im_end|>" would end there)."""
    texts = [
        ("prompt", example.prompt),
        ("demonstration", example.demonstration),
        ("context", example.context),
        ("teacher_system", example.teacher_system),
        ("tools", example.tools),
    ]
    for field, value in texts:
        if value is not None and (token := special_text_in(tokenizer, value)) is not None:
            raise InputError(
                f"{example.where}: the {field} contains {token!r}, the text of one of the model's "
                "special tokens, which the chat template's prompt would turn into that control token; "
                "remove it or write it another way"
            )


def student_text(tokenizer, example: Example) -> str:
    return render(tokenizer, example.prompt, example.tools)


def teacher_text(tokenizer, example: Example, template: str) -> str:
    default = template_system_prompt(tokenizer) if example.teacher_system else None
    return render(tokenizer, teacher_messages(example, template, default), example.tools)


def _assistant_turn(tokenizer, example: Example, content: str) -> str | None:
    """The text an assistant answer adds after the prompt's turns: header, answer, end of turn.
    None when the template rewrites the earlier turns once an answer follows."""
    bare = render(tokenizer, example.prompt, example.tools, add_generation_prompt=False)
    turn = {"role": "assistant", "content": content}
    full = render(tokenizer, [*example.prompt, turn], example.tools, add_generation_prompt=False)
    return full[len(bare) :] if full.startswith(bare) else None


def target_text(tokenizer, example: Example) -> str:
    """The text the chat template writes after the student prompt when the demonstration is the
    assistant's answer: the conversation's text minus the student prompt's. When the generation
    prompt wrote more than the answer's header (DeepSeek-R1-distill opens "<think>\\n") and the
    template rewrites answers (it drops their reasoning), the demonstration as given, without
    what the generation prompt opened (a demonstration without reasoning closes the think
    block empty first), then what the template writes after an answer. Works on text, not
    tokens, so BPE merges across the prompt boundary cannot shift the target."""
    prompt = student_text(tokenizer, example)
    bare = render(tokenizer, example.prompt, example.tools, add_generation_prompt=False)
    generation = prompt[len(bare) :] if prompt.startswith(bare) else None
    written = _assistant_turn(tokenizer, example, example.demonstration)
    if generation is not None and written is not None and written.startswith(generation):
        return written[len(generation) :]
    marked = _assistant_turn(tokenizer, example, _MARK) or ""
    header, end = marked.partition(_MARK)[0], turn_end_text(tokenizer) or ""
    if generation is None or _MARK not in marked or not generation.startswith(header):
        raise InputError(
            f"{example.where}: cannot find where the chat template's answer starts after the "
            f"student prompt {prompt[-80:]!r}"
        )
    opened, demo, think = (
        generation[len(header) :],
        example.demonstration,
        getattr(tokenizer, "think_start", None),
    )
    if not demo:  # a lesson with a teacher context instead: only the end of the turn
        return end
    for start in (opened, opened.strip()):
        if demo.startswith(start):
            return demo[len(start) :] + end
    if think and opened.strip() == think:
        return (
            f"\n{tokenizer.think_end}\n\n{demo}{end}"  # an empty think block, as Qwen3 writes one
        )
    raise InputError(
        f"{example.where}: the chat template's generation prompt ends with {opened!r}; start "
        f"the demonstration with it"
    )


def demonstration_ids(tokenizer, example: Example) -> list[int]:
    """The SFT/check target: `target_text` tokenized on its own, through the first stop token
    (where sampling would stop); the template's end-of-turn (else the eos) when it writes none."""
    ids = encode(tokenizer, target_text(tokenizer, example))
    stops = set(tokenizer.eos_token_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is not None:
        return ids[: end + 1]
    last = turn_end_id(tokenizer)
    return ids + [last if last is not None else min(stops)]


def check_rendering(tokenizer, example: Example) -> None:
    """A template that drops the question (a file name taken as template text, a template that
    ignores user turns) would train on nothing the user wrote: stop and show what it rendered."""
    question = example.prompt[-1]["content"] if example.prompt else None
    text = student_text(tokenizer, example)
    if isinstance(question, str) and question.strip() and question.strip() not in text:
        raise InputError(
            f"{example.where}: the chat template's student prompt does not contain the last user "
            f"message; it rendered {text!r}"
        )


def encode_examples(
    tokenizer, examples: list[Example], template: str, max_seq_length: int
) -> list[PromptPair]:
    """Token ids for both contexts; a prompt that leaves no room for a completion is an error, never cut."""
    pairs = []
    if examples:
        check_rendering(tokenizer, examples[0])
    for ex in examples:
        check_literal(tokenizer, ex)
        student = encode(tokenizer, student_text(tokenizer, ex))
        teacher = encode(tokenizer, teacher_text(tokenizer, ex, template))
        for role, ids in (("prompt", student), ("teacher prompt", teacher)):
            if len(ids) >= max_seq_length:
                raise InputError(
                    f"{ex.where}: the {role} is {len(ids)} tokens, which leaves no room for a completion "
                    f"within --max-seq-length {max_seq_length}"
                )
        pairs.append(
            PromptPair(
                student, teacher, demonstration_ids(tokenizer, ex), ex.where, bool(ex.demonstration)
            )
        )
    return pairs
