"""What a person notices about a personal version, measured on prompts it never trained on:

- **rule gap**: mean per-token KL(model with the rule in its system message ‖ model without it)
  on the model's own greedy answers without it (nats/token). Large when the rule would change
  what the model says; it falls as the weights take the rule in (0: answers as if told);
- **compliance**: the share of greedy answers a rule's check (a regular expression) matches,
  without the rule in the prompt (weights only) and with it (in context);
- **prior answers**: the share of bundled questions with checkable answers ("What is 100
  divided by 4?" → 25) answered right, greedy;
- **loops**: the share of greedy answers that repeat themselves (core/degeneration.py's
  repetition, not truncation: a long answer cut at the budget is not a loop).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx

from mlx_sdft.core.degeneration import is_repetitive
from mlx_sdft.core.losses import kl_of_logits
from mlx_sdft.core.prompts import encode, render, template_system_prompt, with_rules
from mlx_sdft.core.rollout import sample
from mlx_sdft.core.scoring import completion_logits, completion_mask
from mlx_sdft.store.rules import paraphrases_in, prior_questions, questions_in, requests_in

_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")


def contains(prediction: str, reference: str) -> float:
    """1.0 when one of the reference's answers ("|"-separated) appears in the prediction as whole
    words, any case ("90-degree" holds 90; "3.09" does not hold 3)."""
    said = _words(prediction)
    return float(any(_words(answer) in said for answer in reference.split("|")))


def _words(text: str) -> str:
    return f" {' '.join(_TOKEN.findall(text.lower()))} "


@dataclass
class Answers:
    """Greedy answers to a list of prompts: texts, token ids (stop token included) and truncation."""

    texts: list[str]
    ids: list[list[int]]
    truncated: list[bool]
    prompt_ids: list[list[int]]


def greedy(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
    tools: list[list | None] | None = None,
) -> Answers:
    """Greedy answers (temperature 0), `batch_size` prompts at a time; `tools[i]` goes with
    prompts[i]; `advance(n)` after each batch of n prompts (a progress bar)."""
    stops = sorted(tokenizer.eos_token_ids)
    prompt_ids = [
        encode(tokenizer, render(tokenizer, p, t))
        for p, t in zip(prompts, tools or [None] * len(prompts))
    ]
    texts, ids, truncated = [], [], []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        rollout = sample(
            model, batch, [max_tokens] * len(batch), stops, temperature=0.0, batch_size=len(batch)
        )
        for c, t in zip(rollout.completions, rollout.truncated):
            body = c[:-1] if c and c[-1] in stops else c
            texts.append(tokenizer.decode(body))
            ids.append(c)
            truncated.append(t)
        if advance:
            advance(len(batch))
    return Answers(texts, ids, truncated, prompt_ids)


def told(tokenizer, prompts: list[list[dict]], rules: str) -> list[list[dict]]:
    """The prompts with `rules` added to their system message (as serve and the teacher add them)."""
    default = template_system_prompt(tokenizer)
    return [with_rules(p, rules, default) for p in prompts]


def rule_gap(
    model, tokenizer, prompts: list[list[dict]], answers: Answers, rules: str, batch_size: int
) -> float:
    """Mean per-token KL(model told `rules` ‖ model) on `answers` (the model's own, untold)."""
    teacher_ids = [encode(tokenizer, render(tokenizer, p)) for p in told(tokenizer, prompts, rules)]
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        completions = answers.ids[rows]
        student_BTV = completion_logits(model, answers.prompt_ids[rows], completions).astype(
            mx.float32
        )
        teacher_BTV = completion_logits(model, teacher_ids[rows], completions).astype(mx.float32)
        mask_BT = completion_mask([len(c) for c in completions])
        total += (kl_of_logits(teacher_BTV, student_BTV)[0] * mask_BT).sum().item()
        count += int(mask_BT.sum().item())
    return total / max(count, 1)


def compliance(pattern: str, texts: list[str]) -> float:
    return sum(re.search(pattern, t, re.MULTILINE) is not None for t in texts) / max(len(texts), 1)


def loop_rate(tokenizer, answers: Answers) -> float:
    stops = sorted(tokenizer.eos_token_ids)
    return sum(is_repetitive(c, stops) for c in answers.ids) / max(len(answers.ids), 1)


def prior_answers(
    model,
    tokenizer,
    questions: list[dict],
    max_tokens: int,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
    rules: str | None = None,
) -> dict:
    """{"accuracy", "right": [bool per question]} of greedy answers to `questions`, told `rules`
    (a rulebook in the system message) when given."""
    asked = [[{"role": "user", "content": q["prompt"]}] for q in questions]
    answers = greedy(
        model,
        tokenizer,
        told(tokenizer, asked, rules) if rules else asked,
        max_tokens,
        batch_size,
        advance,
    )
    right = [bool(contains(a, q["completion"])) for a, q in zip(answers.texts, questions)]
    return {"accuracy": sum(right) / max(len(right), 1), "right": right}


def drift(
    model,
    tokenizer,
    reference,
    versions: list,
    prompts: list[list[dict]],
    rules: str | None,
    max_tokens: int,
    batch_size: int,
    seed: int | None,
    advance: Callable[[int], None] | None = None,
) -> list[float]:
    """Per version (adapter leaves; None: the model as it is), mean per-token KL(reference told
    `rules` ‖ version untold) on completions sampled (temperature 1; `seed`, else MLX's random
    state) from the told reference: how far each version is from what the user asked for (with no
    rules, eval's retention KL). The reference's samples and logits are shared by all versions."""
    from mlx_sdft.core.teacher import using

    stops = sorted(tokenizer.eos_token_ids)
    untold = [encode(tokenizer, render(tokenizer, p)) for p in prompts]
    told_ids = (
        [encode(tokenizer, render(tokenizer, p)) for p in told(tokenizer, prompts, rules)]
        if rules
        else untold
    )
    totals, count = [0.0] * len(versions), 0
    if seed is not None:
        mx.random.seed(seed)
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        with using(model, reference):
            completions = sample(
                model,
                told_ids[rows],
                [max_tokens] * len(told_ids[rows]),
                stops,
                batch_size=batch_size,
            ).completions
            reference_BTV = completion_logits(model, told_ids[rows], completions).astype(mx.float32)
        mask_BT = completion_mask([len(c) for c in completions])
        for i, leaves in enumerate(versions):
            with using(model, leaves):
                version_BTV = completion_logits(model, untold[rows], completions).astype(mx.float32)
            totals[i] += (kl_of_logits(reference_BTV, version_BTV)[0] * mask_BT).sum().item()
        count += int(mask_BT.sum().item())
        if advance:
            advance(len(completions))
    return [t / max(count, 1) for t in totals]


# The fact first, then the list asked for in a form a small model keeps to (numbered, one per line).
QUESTIONS_PROMPT = (
    "Here is a fact: {fact}\n\nWrite {n} different questions that this fact answers, as different "
    "people might ask them. Number them 1 to {n}, one per line, each ending with a question mark, "
    "and write nothing else."
)


def write_questions(model, tokenizer, fact: str, n: int, max_tokens: int) -> list[str]:
    """Questions about `fact` that the model writes itself (greedy): the prompts a fact is distilled
    over and measured on. store.rules.questions_in says which lines of its answer are such questions;
    the last line of an answer cut off at `max_tokens` is left out (it may stop mid-question)."""
    prompt = [{"role": "user", "content": QUESTIONS_PROMPT.format(n=n, fact=fact)}]
    return questions_in(_whole_lines(greedy(model, tokenizer, [prompt], max_tokens, 1)), fact, n)


def _whole_lines(answer) -> str:
    """One greedy answer's text without its last line when it was cut off at its token budget."""
    text = answer.texts[0]
    return text.rstrip().rpartition("\n")[0] if answer.truncated[0] else text


# One worked example first: asked in words alone, Qwen2.5-Coder-0.5B answered the request or
# repeated it 8 times; shown one rewording, it reworded some (docs/personal.md has the count).
PARAPHRASE_EXAMPLE = [
    {
        "role": "user",
        "content": 'Reword this request 4 ways without answering it: "How do I make bread at home?"',
    },
    {
        "role": "assistant",
        "content": "1. What are the steps to bake bread in my own kitchen?\n2. Can you explain how "
        "to make homemade bread?\n3. I want to bake bread at home. How do I do it?\n"
        "4. How is bread made at home?",
    },
]
PARAPHRASE_PROMPT = 'Reword this request {n} ways without answering it: "{prompt}"'


def write_paraphrases(model, tokenizer, prompt: str, n: int, max_tokens: int) -> list[str]:
    """Rewordings of a request that the model writes itself (greedy): the prompts a one-off lesson is
    also trained and measured on. store.rules.paraphrases_in says which lines of its answer are such;
    the last line of an answer cut off at `max_tokens` is left out (it may stop mid-sentence)."""
    request = [
        *PARAPHRASE_EXAMPLE,
        {"role": "user", "content": PARAPHRASE_PROMPT.format(n=n, prompt=prompt)},
    ]
    return paraphrases_in(
        _whole_lines(greedy(model, tokenizer, [request], max_tokens, 1)), prompt, n
    )


# One worked example first, as for paraphrases: shown only the person's requests, Qwen2.5-Coder-0.5B
# copied them out before writing new ones (docs/personal.md has what it wrote).
REQUESTS_EXAMPLE = [
    {
        "role": "user",
        "content": "A person asked an assistant:\n- How do I bake bread at home?\n- What is the "
        "capital of Peru?\n\nWrite 4 other questions on the same subjects that they did not ask, "
        "numbered. Do not answer them.",
    },
    {
        "role": "assistant",
        "content": "1. How long should bread dough rise?\n2. Which language is spoken in Peru?\n"
        "3. Can I bake bread without yeast?\n4. What is the highest mountain in Peru?",
    },
]
REQUESTS_PROMPT = (
    "A person asked an assistant:\n{asked}\n\nWrite {n} other questions on the same subjects that "
    "they did not ask, numbered. Do not answer them."
)


def write_requests(
    model, tokenizer, asked: list[str], n: int, max_tokens: int, known: list[str] = ()
) -> list[str]:
    """New requests on the subjects of `asked` that the model writes itself (greedy): more prompts
    in the user's own domains for the rules to be distilled over. store.rules.requests_in says which
    lines are such (none of `asked` or `known`); a line cut off at `max_tokens` is left out."""
    request = [
        *REQUESTS_EXAMPLE,
        {
            "role": "user",
            "content": REQUESTS_PROMPT.format(asked="\n".join(f"- {a}" for a in asked), n=n),
        },
    ]
    text = _whole_lines(greedy(model, tokenizer, [request], max_tokens, 1))
    return requests_in(text, [*asked, *known], n)
