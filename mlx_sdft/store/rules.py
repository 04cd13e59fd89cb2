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


def counted(rows: list[dict]) -> str:
    """How many rules and facts `rows` hold, in words: "1 rule", "2 rules and 1 fact"."""
    kinds = [row["kind"] for row in rows]
    return " and ".join(
        f"{n} {kind if n == 1 else kind + 's'}"
        for kind in ("rule", "fact")
        if (n := kinds.count(kind))
    )


def check_text(text: str, what: str) -> str:
    """A rule's or fact's text as stored, or InputError: blank, too long, or holding three double
    quotes in a row (which would end the SYSTEM block of an exported Ollama Modelfile)."""
    text = text.strip()
    if not text:
        raise InputError(f"{what}: must not be blank")
    if len(text) > MAX_CHARS:
        raise InputError(
            f"{what}: {len(text)} characters; a rule or fact is in every prompt, so it may have at "
            f"most {MAX_CHARS}"
        )
    if '"""' in text:
        raise InputError(
            f'{what}: contains """, which an exported Modelfile\'s SYSTEM block cannot hold'
        )
    return text


def add_standing(
    store, kind: str, text: str, check: str | None = None, exchange_id: str | None = None
) -> tuple[int, list[str]]:
    """Store a rule or fact (serve puts it in the prompt from its next request on): its id, and
    the lines that say so."""
    text = check_text(text, f"--{kind}" if exchange_id is None else "--feedback")
    lesson_id = store.add_lesson(kind=kind, text=text, check_regex=check, exchange_id=exchange_id)
    return lesson_id, [
        f"{kind} {lesson_id}: in every answer of serve from its next request on; `mlx-sdft learn` "
        f"distills it into the weights (`mlx-sdft rules check {lesson_id}` measures whether the model "
        "follows it when told)"
    ]


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


def acts_at_end(pattern: str | None) -> bool:
    """Whether a rule's check is anchored at the end of an answer (a final `$` or `\\Z` not escaped,
    as in `Sam\\s*$`): such a rule (a signature) shows only in an answer that is whole."""
    body = (pattern or "").rstrip()
    for anchor in ("$", "\\Z"):
        if body.endswith(anchor):
            before = body[: -len(anchor)]
            return (len(before) - len(before.rstrip("\\"))) % 2 == 0
    return False


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
    preflight), split by hash as the other prompts are (`split`)."""
    return split(
        [
            [{"role": "user", "content": q}]
            for q in ((row.get("preflight") or {}).get("questions") or [])
        ]
    )


def split(prompts: list[list[dict]]) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training, held-out) prompts the model wrote, split by a hash of their last message as the
    bundled ones are (so the same text is always on the same side); at least one of each when there
    are two."""
    held_out = [p for p in prompts if is_held_out(p[-1]["content"])]
    if not held_out and len(prompts) > 1:
        held_out = prompts[-1:]
    train = [p for p in prompts if p not in held_out]
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
    return [
        Example(p, "", None, f"rules:prompt/{i}", "{question}", {}, book)
        for i, p in enumerate(prompts)
    ]


# ---- the questions a fact is distilled over ----------------------------------------------------

_LISTED = re.compile(r"^\s*(?:(?:Q(?:uestion)?\s*)?\d+\s*[.):]|[-*•])\s*", re.IGNORECASE)
_WORD = re.compile(r"[^\W\d_]{4,}|\d+")
_COMMON = frozenset(
    "that this with from were have been about which what when where whose there their they also "
    "into than then them does your some".split()
)


def list_items(text: str) -> list[tuple[str, bool]]:
    """The non-blank lines of a model's answer, each with whether it was an item of a numbered or
    bulleted list; list markers, markdown emphasis and quotes stripped."""
    out = []
    for line in text.splitlines():
        listed = _LISTED.match(line) is not None
        line = _LISTED.sub("", line).strip().strip("*_\"'` ").strip()
        if line:
            out.append((line, listed))
    return out


def questions_in(text: str, fact: str, n: int) -> list[str]:
    """The questions about `fact` in a model's list, in order, at most n and no repeats: a line that
    ends with "?" or is numbered or bulleted (a "?" added), markdown and quotes stripped, kept only if
    it names a word of the fact (of 4 letters or more, or a number): one about something else is not
    a question the fact answers."""
    words = _words(fact)
    out = []
    for line, listed in list_items(text):
        if not (listed or line.endswith("?")):
            continue
        line = line if line.endswith("?") else line.rstrip(".:;,") + "?"
        if _words(line) & words and line not in out:
            out.append(line)
    return out[:n]


def paraphrases_in(text: str, prompt: str, n: int) -> list[str]:
    """The rewordings of `prompt` in a model's numbered or bulleted list, in order, at most n: new
    lines (`requests_in`) different from the prompt, at most twice as long as it (and 40
    characters), and naming a word of it (of 4 letters or more, or a number) when it has any: an
    answer to the prompt written as a list is not one."""
    words = _words(prompt)
    lines = requests_in(text, [prompt], limit=2 * len(prompt) + 40)
    return [line for line in lines if not words or _words(line) & words][:n]


REQUEST_CHARS = 300  # a longer line is not one request


def requests_in(
    text: str, known: list[str], n: int | None = None, limit: int = REQUEST_CHARS
) -> list[str]:
    """The new requests in a model's numbered or bulleted list, in order, at most n: each different
    from every `known` one (the examples it was shown, the held-out prompts) and from the others
    (case, spaces and end punctuation aside), and at most `limit` characters long."""
    seen, out = {_plain(k) for k in known}, []
    for line, listed in list_items(text):
        if listed and len(line) <= limit and _plain(line) not in seen:
            seen.add(_plain(line))
            out.append(line)
    return out[:n]


def _plain(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!?;:, ")


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _COMMON}


# A fact's subject ends at its first verb of being, having or doing (which stays with the predicate).
_VERB = re.compile(
    r"\s+(?=(?:is|are|was|were|has|have|had|lives|lived|works|worked|wrote|won|can|will|\w+ed)\b)",
    re.IGNORECASE,
)
_DETERMINERS = frozenset("the a an my our your this these that those its his her their".split())
TEMPLATE_QUESTIONS = (
    "What do you know about {subject}?",
    "Tell me one thing about {subject}.",
    "Is it true that {fact}?",
    "Complete the sentence: {subject} {verb} ...",
    "What is true of {subject}?",
    "Can you tell me about {subject}?",
    "In one sentence, what should I know about {subject}?",
    "Fill in the blank: {subject} {verb} ___.",
    "Quick question: what about {subject}?",
    "I keep forgetting: what about {subject}?",
    "Remind me, what do you know about {subject}?",
    "Do you know anything about {subject}?",
)


def template_questions(fact: str, n: int) -> list[str]:
    """At most n questions built from the fact's own words, the same every time: the questions of a
    fact when the model writes too few. Its subject is the words before its first verb (the whole
    fact, quoted, when none is found: then the sentence-completion questions are left out)."""
    body = fact.strip().rstrip(".!")
    if (
        body.split(" ", 1)[0].lower() in _DETERMINERS
    ):  # "The meeting ..." mid-sentence: "the meeting"
        body = body[:1].lower() + body[1:]
    parts = _VERB.split(body, maxsplit=1)
    found = len(parts) == 2 and bool(parts[0])
    subject, verb = (parts[0], parts[1].split()[0]) if found else (f'"{body}"', "")
    return [
        t.format(subject=subject, verb=verb, fact=body)
        for t in TEMPLATE_QUESTIONS
        if found or "{verb}" not in t
    ][:n]
