"""Standing lessons: rules ("Always end with '- Sam'") and facts ("Middlemarch was written by
George Eliot"). Unlike a one-off correction, a standing lesson applies to every answer, so

- `serve` puts the rulebook (the active rules and facts) in the system message of every request
  at once (`in_prompt`), and
- `learn` distills it into the weights over many prompts (context distillation): the teacher is the
  model with the rulebook in its system message, the student the same model without it.

The prompts come from the bundled general and topic prompts and the user's own stored requests,
split once and for all by a hash of their topic (or text) into a training part and a held-out part
that nothing ever trains on; the gate measures every rule on the held-out part.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib.resources import files

from mlx_sdft.core.data import Example
from mlx_sdft.errors import InputError

HELD_OUT_SHARE = 5  # one prompt group in 5 is held out
FACT_PREFIX = "Keep in mind: "  # a fact as the rulebook states it


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


def check_regex(pattern: str | None, where: str) -> str | None:
    """A rule's compliance check, compiled once to refuse a bad one when it is given."""
    if pattern is None:
        return None
    try:
        re.compile(pattern)
    except re.error as e:
        raise InputError(f"{where}: not a regular expression ({e})") from None
    return pattern


def complies(pattern: str, answer: str) -> bool:
    """Whether an answer follows a rule by its check (searched in multiline mode: ^ and $ per line)."""
    return re.search(pattern, answer, re.MULTILINE) is not None


# ---- the prompts a rulebook is distilled over --------------------------------------------------


def _bundled(name: str) -> list[dict]:
    text = (files("mlx_sdft") / "assets" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prior_questions(limit: int) -> list[dict]:
    """The first `limit` bundled questions with checkable answers ({"prompt", "completion"}: "Mars",
    "seven|7"), for the gate's prior-answers check."""
    return _bundled("prior_questions.jsonl")[:limit]


def _group(prompt: list[dict], topic: str | None) -> str:
    return topic or prompt[-1]["content"]


def is_held_out(group: str) -> bool:
    """Fixed for a prompt group forever, so no learn ever trains on what a gate measures with."""
    return int(hashlib.sha256(group.encode()).hexdigest(), 16) % HELD_OUT_SHARE == 0


def prompt_pool(own: list[list[dict]] = ()) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training prompts, held-out prompts): the bundled general and topic prompts and `own` (the
    user's stored requests, as message lists ending with a user turn), each once, in a fixed order."""
    bundled = [(r["prompt"], r.get("topic")) for r in _bundled("topic_prompts.jsonl") + _bundled("general_prompts.jsonl")]
    seen, train, held_out = set(), [], []
    for rows in (bundled, [(messages, None) for messages in own]):
        held = []
        for prompt, topic in rows:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            key = json.dumps(messages, ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            (held if is_held_out(_group(messages, topic)) else train).append(messages)
        # mixed, so the first N span many topics; the bundled ones first, so the gate's first N stay
        # the same prompts however many requests are stored
        held_out += sorted(held, key=_digest)
    return train, held_out


def _digest(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()


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
