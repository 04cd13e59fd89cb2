"""Lessons as training data: from an exchange to a lesson row, from a row to `core.data.Example`,
and .jsonl in and out in the formats `mlx-sdft train --data` reads.

- demonstration, import: the prompt + the demonstration; the teacher uses the run's --teacher-template.
- feedback: the prompt, no demonstration; the teacher sees the lesson's own template filled with
  {question}, {answer} (the model's earlier answer) and {feedback}.
- hindsight: the same with {followup}, the user's next message.

A one-off lesson's prompt reworded by the model (`learn --lesson-paraphrases`, kept in the lesson's
preflight column) gives it more examples: the same lesson, the last user message reworded, split by
hash into those it trains on and those held out for the gate (`paraphrased`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from mlx_sdft import atomic
from mlx_sdft.core.data import Example, load_examples
from mlx_sdft.core.prompts import teacher_messages
from mlx_sdft.errors import InputError
from mlx_sdft.store.db import STANDING, Store
from mlx_sdft.store.rules import counted, split

SLOT = {
    "feedback": "feedback",
    "hindsight": "followup",
}  # the context slot that holds a lesson's text


def prompt_of(messages: list[dict], where: str) -> list[dict]:
    """An exchange's messages, which must end with a user turn, as `train`'s prompts do. Cutting
    an exchange that goes on (a tool result, an assistant turn) back to its last user turn would
    teach the answer without what it answered (e.g. without the tool's result), so it is refused."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        raise InputError(f"{where}: the exchange has no user message to learn an answer to")
    if last < len(messages) - 1:
        after = ", ".join(m.get("role", "?") for m in messages[last + 1 :])
        raise InputError(
            f"{where}: the exchange goes on after its last user message ({after}); a lesson's prompt "
            "must end with the user's message, so this answer cannot be taught (`mlx-sdft lessons "
            "import` a demonstration instead)"
        )
    return messages


def from_exchange(exchange: dict, kind: str, text: str, template: str | None = None) -> dict:
    """A lesson on a stored exchange: `text` is the demonstration (kind demonstration), the
    feedback or the follow-up (with `template`, the teacher prompt of those kinds)."""
    lesson = {
        "kind": kind,
        "exchange_id": exchange["id"],
        "prompt": prompt_of(exchange["messages"], exchange["id"]),
        "tools": exchange["tools"],
        "text": text,
    }
    if kind != "demonstration":
        lesson.update(answer=exchange["answer"], teacher_template=template)
    return lesson


# `teach` loads no model, so it cannot count a lesson's tokens: it refuses a text over 8 characters
# per token of an 8,192-token context (the default model's; prose takes about 4 per token). serve
# counts exactly with the model's tokenizer, and learn names any stored lesson that does not fit,
# with the command that removes it.
MAX_CHARS = 8 * 8192


def check_size(text: str, what: str) -> None:
    if len(text) > MAX_CHARS:
        raise InputError(
            f"{what}: {len(text)} characters, more than the {MAX_CHARS} a lesson may have (8 per token "
            "of an 8,192-token context); learn could not fit it in the model's context: shorten it"
        )


WHERE = "store:lesson/"  # + the id: where a lesson's example comes from, in every message about it


def removable(error: InputError) -> InputError:
    """An error about a stored lesson (its message starts with its `where`) as one that names the
    lesson and the command that removes it; any other error as it is."""
    found = re.match(re.escape(WHERE) + r"(\d+)(?:/paraphrase/\d+)?: ", str(error))
    if found is None:
        return error
    id = found.group(1)
    return type(error)(
        f"lesson {id}: {str(error)[found.end() :]}; this lesson cannot be learned: remove it with "
        f"`mlx-sdft lessons delete {id}`"
    )


def to_example(row: dict) -> Example:
    """The lesson as the trainer reads it; `where` is "store:lesson/ID"."""
    where = f"{WHERE}{row['id']}"
    if row["state"] == "deleted":
        raise InputError(f"{where}: deleted")
    if (
        row["kind"] in STANDING
    ):  # a rule has no prompt of its own: learn distills it over many (store/rules.py)
        raise InputError(f"{where}: a {row['kind']} is not one example (see mlx-sdft rules)")
    if row["kind"] in SLOT:
        context = {"answer": row["answer"], SLOT[row["kind"]]: row["text"]}
        return Example(row["prompt"], "", row["tools"], where, row["teacher_template"], context)
    return Example(row["prompt"], row["text"], row["tools"], where)


def paraphrased(row: dict, n: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples of the first n of a one-off lesson's stored paraphrases: its own
    example with the last user message reworded (the rest of the conversation, the tools and the
    teacher's context kept), split by a hash of the rewording (store.rules.split)."""
    *history, last = row["prompt"]
    texts = ((row.get("preflight") or {}).get("paraphrases") or [])[:n]
    prompts = [[*history, {**last, "content": text}] for text in texts]
    example = to_example(row)
    return tuple(
        [
            dataclasses.replace(
                example, prompt=p, where=f"{example.where}/paraphrase/{prompts.index(p) + 1}"
            )
            for p in part
        ]
        for part in split(prompts)
    )


def shown_not_taught(example: Example, template: str) -> Example:
    """The example with its demonstration in the teacher's context only (in `template`, the run's
    --teacher-template), and none of its own: the teacher answers as if shown it, while there is no
    SFT target and the completion budget is not measured by it (a paraphrase's demonstration was
    written for another wording of the prompt)."""
    if not example.demonstration:
        return example
    return dataclasses.replace(
        example,
        demonstration="",
        teacher_template=example.teacher_template or template,
        context={**(example.context or {}), "demonstration": example.demonstration},
    )


def teacher_view(row: dict, template: str) -> str:
    """What the teacher's last user message will say (the run's `template` for demonstrations)."""
    return teacher_messages(to_example(row), template)[-1]["content"]


def to_line(row: dict) -> dict:
    """One .jsonl line that `core.data` reads back into the same Example (plus its lesson id)."""
    example = to_example(row)
    line: dict = {"prompt": example.prompt}
    if example.teacher_template:
        line.update(teacher_template=example.teacher_template, context=example.context)
    else:
        line["completion"] = example.demonstration
    if example.tools:
        line["tools"] = example.tools
    line["lesson"] = row["id"]  # provenance; readers ignore extra keys
    return line


def export(store: Store, path: str | Path, state: str | None = None, *, force: bool = False) -> int:
    """Write the lessons (default: all but deleted) to `path`, atomically; returns how many. An
    existing `path` is refused (InputError) unless `force`."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise InputError(f"{path}: already exists (--force replaces it)")
    rows = store.lessons(state, standing=False)  # rules and facts: `mlx-sdft rules --json`
    if not rows:
        skipped = left_out(store, state)
        raise InputError(
            f"{store.path}: no lessons{f' in state {state}' if state else ''} to export"
            + (f" ({skipped})" if skipped else "")
        )
    text = "".join(json.dumps(to_line(row), ensure_ascii=False) + "\n" for row in rows)
    try:
        atomic.write_text(path, text)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    return len(rows)


def left_out(store: Store, state: str | None = None) -> str:
    """What `export` leaves out, in words ("1 rule and 2 facts left out: ..."), or "" for nothing:
    rules and facts have no demonstration to train on."""
    skipped = counted(store.lessons(state, standing=True))
    return skipped and f"{skipped} left out: rules and facts are not training examples"


def import_file(store: Store, path: str | Path) -> list[int]:
    """Every example of a .jsonl file as a lesson, all or none (read_import)."""
    return store.add_lessons(read_import(path))


def read_import(path: str | Path) -> list[dict]:
    """Every example of a .jsonl file (any format `train` reads) as a lesson row, every line checked
    first (so a bad file is refused before a store is opened or created): demonstrations become kind
    `import`; lines with their own teacher template become `feedback` or `hindsight` lessons, by the
    context they carry."""
    lessons = []
    for ex in load_examples(path):  # validates every line first
        for text in [ex.demonstration, *(ex.context or {}).values()]:
            check_size(text, ex.where)
        lesson = {
            "kind": "import",
            "prompt": ex.prompt,
            "tools": ex.tools,
            "text": ex.demonstration,
        }
        if ex.teacher_template:
            kind = next((k for k, slot in SLOT.items() if slot in ex.context), None)
            if kind is None or "answer" not in ex.context:
                raise InputError(
                    f"{ex.where}: a lesson line needs the context answer and feedback or followup"
                )
            lesson.update(
                kind=kind,
                text=ex.context[SLOT[kind]],
                answer=ex.context["answer"],
                teacher_template=ex.teacher_template,
            )
        lessons.append(lesson)
    return lessons
