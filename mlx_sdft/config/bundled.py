"""The prompts and questions shipped in mlx_sdft/assets/: the general and topic prompts a rulebook
is distilled over, and questions with checkable answers. Each prompt group (its topic, or its
text) is held out or not by a hash of it, fixed forever, so no `learn` ever trains on what a gate
measures with. They sit with the options, below the store that distills rules over them
(store/rules.py), because learn's --gate-prompts and --gate-questions are checked against how
many there are (config/personal.py).
"""

from __future__ import annotations

import hashlib
import json
from importlib.resources import files

HELD_OUT_SHARE = 5  # one prompt group in 5 is held out


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
    bundled = [
        (r["prompt"], r.get("topic"))
        for r in _bundled("topic_prompts.jsonl") + _bundled("general_prompts.jsonl")
    ]
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
