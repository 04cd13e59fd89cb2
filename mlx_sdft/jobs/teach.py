"""`mlx-sdft teach` and `mlx-sdft lessons`: the experience store from the command line.
Only the store is imported (no MLX), so these answer at once. Each function returns the lines
to print; the CLI prints them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlx_sdft.config import TEACHER_TEMPLATE, LessonsConfig, TeachConfig
from mlx_sdft.errors import InputError
from mlx_sdft.machine.report import count_of
from mlx_sdft.store import lessons, rules
from mlx_sdft.store.db import FILENAME, STANDING, Store, existing_home


def teach(cfg: TeachConfig) -> list[str]:
    """List exchanges, correct one (a demonstration or a feedback lesson), import a file, or
    forget every exchange."""
    rows = (
        lessons.read_import(cfg.import_file) if cfg.import_file else None
    )  # a bad file: before the home exists
    path = Path(cfg.home).expanduser() / FILENAME
    if cfg.list or cfg.forget_exchanges:  # nothing to read or forget: no home is made for it
        existing_home(cfg.home)
    if not path.exists() and cfg.rule is None and cfg.fact is None and not cfg.import_file:
        if cfg.list or cfg.forget_exchanges:
            return [f"no exchanges in {path}"]
        raise InputError(
            f"{cfg.exchange}: no such exchange in {path} (see mlx-sdft exchanges list)"
        )
    with Store(cfg.home, cfg.redact) as store:
        if cfg.list:
            rows = store.exchanges(cfg.limit)
            return [_exchange_line(r) for r in rows] or [f"no exchanges in {store.path}"]
        if cfg.import_file:
            ids = store.add_lessons(rows)
            which = (
                f"lesson {ids[0]}" if len(ids) == 1 else f"{len(ids)} lessons ({ids[0]}..{ids[-1]})"
            )
            return [f"imported {which} from {cfg.import_file}"]
        if cfg.forget_exchanges:
            return [
                f"forgot {count_of(store.forget_exchanges(), 'exchange')}; {store.path} compacted"
            ]
        if cfg.rule is not None or cfg.fact is not None:
            return rules.add_standing(
                store, "rule" if cfg.rule is not None else "fact", cfg.rule or cfg.fact, cfg.check
            )[1]
        exchange = store.exchange(cfg.exchange)
        if exchange is None:
            raise InputError(
                f"{cfg.exchange}: no such exchange in {store.path} (see mlx-sdft exchanges list)"
            )
        if (
            cfg.always
        ):  # a correction meant for every answer: a rule, which remembers where it came from
            return rules.add_standing(store, "rule", cfg.feedback, cfg.check, exchange["id"])[1]
        kind, text = (
            ("demonstration", cfg.answer) if cfg.answer is not None else ("feedback", cfg.feedback)
        )
        lessons.check_size(text, "--answer" if kind == "demonstration" else "--feedback")
        lesson_id = store.add_lesson(
            **lessons.from_exchange(exchange, kind, text, cfg.feedback_template)
        )
        return [f"lesson {lesson_id} ({kind}) on exchange {exchange['id']}"]


def listing(cfg: LessonsConfig) -> list[str]:
    """The lessons (or --export them as .jsonl for `mlx-sdft train --data`)."""
    with Store(cfg.home, create=False) as store:
        if cfg.export:
            count = lessons.export(store, cfg.export, cfg.state, force=cfg.force)
            skipped = lessons.left_out(store, cfg.state)
            return [
                f"wrote {count_of(count, 'lesson')} to {cfg.export}"
                + (f" ({skipped})" if skipped else "")
                + f"; train on them with: mlx-sdft train --data {cfg.export} ..."
            ]
        rows = store.lessons(cfg.state)
    if cfg.json:
        return [json.dumps(rows, ensure_ascii=False, indent=1)]
    return [_lesson_line(r) for r in rows] or ["no lessons"]


def show(cfg: LessonsConfig) -> list[str]:
    """One lesson in full, with what its teacher will be shown."""
    with Store(cfg.home, create=False) as store:
        row = _lesson(store, cfg.lesson)
    if cfg.json:
        return [json.dumps(row, ensure_ascii=False, indent=1)]
    lines = [
        f"lesson {row['id']}: {row['kind']}, {row['state']}, exchange {row['exchange_id'] or '-'}, "
        f"created {_time(row['created'])}"
    ]
    if row["state"] == "deleted":
        return lines
    lines += [f"  {m['role']}: {m['content']}" for m in row["prompt"]]
    if row["kind"] in STANDING:
        return (
            lines
            + [f"  {row['kind']}: {row['text']}"]
            + ([f"  check: {row['check_regex']}"] if row["check_regex"] else [])
        )
    if row["answer"] is not None:
        lines.append(f"  model's answer: {row['answer']}")
    lines.append(f"  {row['kind']}: {row['text']}")
    lines.append(
        "teacher's context (last user message):"
        + ("" if row["teacher_template"] else " (with the default --teacher-template)")
    )
    lines.append(lessons.teacher_view(row, TEACHER_TEMPLATE))
    return lines


def delete(cfg: LessonsConfig) -> list[str]:
    with Store(cfg.home, create=False) as store:
        _lesson(store, cfg.lesson)
        if not store.delete_lesson(cfg.lesson):
            return [f"lesson {cfg.lesson} was already deleted"]
    return [f"deleted lesson {cfg.lesson} (its texts are erased; the id stays as a tombstone)"]


def purge(cfg: LessonsConfig) -> list[str]:
    with Store(cfg.home, create=False) as store:
        return [f"purged {count_of(store.purge_lessons(), 'lesson')}; {store.path} compacted"]


def _lesson(store: Store, id: int | None) -> dict:
    if id is None:
        raise InputError("LESSON: give the lesson's id (see mlx-sdft lessons)")
    row = store.lesson(id)
    if row is None:
        raise InputError(f"lesson {id}: no such lesson in {store.path} (see mlx-sdft lessons)")
    return row


def _exchange_line(row: dict) -> str:
    question = next((m["content"] for m in reversed(row["messages"]) if m["role"] == "user"), "")
    return (
        f"{row['id']}  {_time(row['created'])}  v{row['version']}  {_short(question)!r} -> "
        f"{_short(row['answer'])!r}"
    )


def _lesson_line(row: dict) -> str:
    return f"{row['id']:>5}  {row['kind']:<13} {row['state']:<8} {row['exchange_id'] or '-':<13} {_short(row['text'])!r}"


def _short(text: str, limit: int = 50) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))
