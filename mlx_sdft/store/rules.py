"""Standing lessons: rules ("Always end with '- Sam'") and facts ("Middlemarch was written by
George Eliot"). Unlike a one-off correction, a standing lesson applies to every answer, so

- `serve` puts the rulebook (the active rules and facts) in the system message of every request
  at once (`in_prompt`), and
- `learn` distills it into the weights over many prompts (context distillation): the teacher is the
  model with the rulebook in its system message, the student the same model without it.

The prompts come from the bundled general and topic prompts and the user's own stored requests,
split once and for all by a hash of their topic (or text) into a training part and a held-out part
that nothing ever trains on (`prompt_pool`, config/bundled.py); the gate measures every rule on the
held-out part.
"""

from __future__ import annotations

import hashlib
import json
import re

# prior_questions, prompt_pool: learn, `rules` and measure/ read them here, with the rest of the rulebook's prompts
from mlx_sdft.config.bundled import is_held_out, prior_questions, prompt_pool  # noqa: F401
from mlx_sdft.core.data import Example
from mlx_sdft.errors import InputError

FACT_PREFIX = "Keep in mind: "  # a fact as the rulebook states it


# A rule or fact is in the system message of every request: at most this long (about 500 tokens),
# so a pasted document cannot crowd out the conversations it is meant to shape.
MAX_CHARS = 2000


def check_text(text: str, what: str) -> str:
    """A rule's or fact's text as stored, or InputError: blank, too long, or holding three double
    quotes in a row (which would end the SYSTEM block of an exported Ollama Modelfile)."""
    text = text.strip()
    if not text:
        raise InputError(f"{what}: must not be blank")
    if len(text) > MAX_CHARS:
        raise InputError(f"{what}: {len(text)} characters; a rule or fact is in every prompt, so it may have at "
                         f"most {MAX_CHARS}")
    if '"""' in text:
        raise InputError(f'{what}: contains """, which an exported Modelfile\'s SYSTEM block cannot hold')
    return text


def rulebook(rows: list[dict]) -> str | None:
    """The system-message text of these rule and fact lessons, one per line (None for none)."""
    lines = [FACT_PREFIX + r["text"] if r["kind"] == "fact" else r["text"] for r in rows]
    return "\n".join(lines) or None


def fingerprint(rows: list[dict]) -> str:
    """A short digest of a rulebook: which rules answered a request (`system_fingerprint`)."""
    text = json.dumps([[r["id"], r["text"]] for r in rows], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def held(record: dict | None) -> set[int]:
    """Ids of the rules a version's gate found to hold in its weights alone."""
    rules = ((record or {}).get("gate") or {}).get("rules") or {}
    return {int(i) for i, r in rules.items() if r.get("holds")}


def in_prompt(rows: list[dict], mode: str, record: dict | None) -> list[dict]:
    """The rules serve puts in the prompt: all (`always`), none (`never`), or those the serving
    version has not shown to hold without them (`auto`)."""
    if mode == "never":
        return []
    if mode == "auto":
        done = held(record)
        return [r for r in rows if r["id"] not in done]
    return rows


def complies(pattern: str, answer: str) -> bool:
    """Whether an answer follows a rule by its check (searched in multiline mode: ^ and $ per line)."""
    return re.search(pattern, answer, re.MULTILINE) is not None


# ---- the prompts a rulebook is distilled over --------------------------------------------------


def own_prompts(exchanges: list[dict]) -> list[list[dict]]:
    """The user's requests (their messages without system turns, which serve's rules would join)."""
    out = []
    for e in exchanges:
        messages = [m for m in e["messages"] if m.get("role") != "system"]
        if messages and messages[-1].get("role") == "user" and not e.get("tools"):
            out.append(messages)
    return out


def fact_prompts(row: dict) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training, held-out) questions of a fact: those the model wrote about it (kept with its
    preflight), split by hash as the other prompts are; at least one of each when there are two."""
    questions = [[{"role": "user", "content": q}] for q in ((row.get("preflight") or {}).get("questions") or [])]
    held_out = [q for q in questions if is_held_out(q[0]["content"])]
    if not held_out and len(questions) > 1:
        held_out = questions[-1:]
    train = [q for q in questions if q not in held_out]
    if not train and len(held_out) > 1:
        train, held_out = held_out[:1], held_out[1:]
    return train, held_out


def prompts_for(row: dict, held_out: list[list[dict]]) -> list[list[dict]]:
    """The held-out prompts a standing lesson is measured on: a rule's are the general ones, a
    fact's its own held-out questions."""
    return fact_prompts(row)[1] if row["kind"] == "fact" else held_out


def distillation_examples(prompts: list[list[dict]], book: str) -> list[Example]:
    """One example per prompt: the student sees the prompt, the teacher the prompt with `book`
    added to its system message; no demonstration, so only the divergence trains."""
    return [Example(p, "", None, f"rules:prompt/{i}", "{question}", {}, book) for i, p in enumerate(prompts)]
