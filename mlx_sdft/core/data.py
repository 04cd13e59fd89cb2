"""Demonstration data: `--data` (.jsonl files) in, validated `Example`s out.

`--data` is one .jsonl file, or a folder holding train.jsonl and optionally valid.jsonl and
test.jsonl. Each line is one example, in one of four formats, detected per file from its
first non-blank line (every other line must use the same one):

    {"messages": [..., {"role": "assistant", "content": DEMO}], "tools": [...]}
    {"prompt": P, "completion": DEMO}
    {"prompt": P, "privileged_context": DEMO}          (TRL's SDFT format)
    {"prompt": P, "teacher_template": T, "context": {"answer": A, "feedback": F}}
    {"prompt": P, "teacher_system": S}

The last two have no demonstration (`mlx-sdft lessons export` writes them). In the first, the
teacher sees T filled with the question and the context (slots {answer}, {feedback}, {followup}),
e.g. a correction in words of the model's earlier answer A. In the second, the teacher sees the
prompt with S added to its system message (a standing rule: context distillation, the student
learns to answer as if S were in its prompt). Such lines may sit in a file of any format, and
"teacher_system" may be added to a line of any format.

P is a non-empty string (one user message) or a list of chat messages ending with a user
message. An assistant turn that calls tools may have null content (read as "") and arguments
given as a JSON string (read as the object it holds), as OpenAI clients send them. Every line is
checked before any model loads; any problem raises `InputError` with one line, "path:line: what
is wrong". This module knows nothing about tokenization.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_sdft.core import hub_data
from mlx_sdft.errors import InputError, one_line

ROLES = ("assistant", "developer", "system", "tool", "user")
CONTEXT_SLOTS = (
    "answer",
    "feedback",
    "followup",
)  # teacher-template slots besides {question} and {demonstration}
OWN_TEMPLATE = "prompt/teacher_template"
OWN_SYSTEM = "prompt/teacher_system"
NO_DEMONSTRATION = (OWN_TEMPLATE, OWN_SYSTEM)  # formats that mix with any other
SPLITS = ("train", "valid", "test")
BOM = b"\xef\xbb\xbf"
_JSON_NAMES = {
    type(None): "null",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "an object",
}
_MISSING = object()  # stands for an absent key, so messages can say "missing" rather than "null"


@dataclass(frozen=True)
class Example:
    """One demonstration: the student sees `prompt`; the teacher also sees `demonstration`."""

    prompt: list[dict]  # chat messages, ending with a user message
    demonstration: (
        str  # kept verbatim (not stripped); "" for a lesson whose teacher sees a context instead
    )
    tools: list | None = None  # tool specs for the chat template, if the line had "tools"
    where: str = ""  # "path:line", for messages about this example
    teacher_template: str | None = (
        None  # this example's own teacher prompt (else the run's --teacher-template)
    )
    context: dict | None = (
        None  # values of its CONTEXT_SLOTS, e.g. {"answer": ..., "feedback": ...}
    )
    teacher_system: str | None = (
        None  # added to the teacher's system message only (rules to distill)
    )


def need_demonstrations(examples: list[Example], what: str) -> None:
    """InputError for the first example that has only a teacher context: `what` needs a demonstration."""
    for ex in examples:
        if not ex.demonstration:
            raise InputError(
                f"{ex.where}: this example has a teacher context but no demonstration, which {what} needs"
            )


def load_dataset(data: str | Path) -> dict[str, list[Example]]:
    """A .jsonl file -> {"train": [...]}; a folder -> its train (required), valid and test splits;
    a Hugging Face dataset (a hub id, or a folder saved by `datasets`) -> its splits (hub_data.py)."""
    root = Path(data)
    kind = _kind(root)
    if kind == "missing":
        if hub_data.is_hub_id(str(data)):
            return {
                key: examples_from_rows(rows, where)
                for key, where, rows in hub_data.load(str(data))
            }
        raise InputError(f"{root}: no such file or folder")
    if kind == "file":
        return {"train": load_examples(root)}
    if _kind(root / "train.jsonl") == "missing":
        if hub_data.is_saved_dataset(root):
            return {
                key: examples_from_rows(rows, where)
                for key, where, rows in hub_data.load(str(root), root)
            }
        raise InputError(f"{root}: folder has no train.jsonl")
    return {
        split: load_examples(root / f"{split}.jsonl")
        for split in SPLITS
        if _kind(root / f"{split}.jsonl") != "missing"
    }


def load_examples(path: str | Path) -> list[Example]:
    """Read and validate every line of one .jsonl file; blank lines are skipped."""
    path = Path(path)

    def rows():
        for lineno, raw in enumerate(_read_lines(path), start=1):
            text = _decode(raw, f"{path}:{lineno}")
            if text.strip():
                yield lineno, _parse_json(text, f"{path}:{lineno}")

    return examples_from_rows(rows(), str(path))


def examples_from_rows(rows, source: str) -> list[Example]:
    """Validate (line number, parsed object) pairs of one file or dataset split into Examples; every
    problem is an InputError "SOURCE:LINE: what is wrong". All rows must share the first one's format."""
    examples: list[Example] = []
    first: tuple[int, str] | None = None  # (line number, format) of the first example
    for lineno, obj in rows:
        where = f"{source}:{lineno}"
        fmt = _format_of(obj, where)
        if fmt in NO_DEMONSTRATION:
            pass  # mixes with any format: lessons without a demonstration next to those with one
        elif first is None:
            first = (lineno, fmt)
        elif fmt != first[1]:
            raise InputError(
                f"{where}: mixed formats: line {first[0]} is {first[1]}, this line is {fmt}"
            )
        examples.append(_example(obj, fmt, where))
    if not examples:
        raise InputError(f"{source}: no examples")
    return examples


# ---- reading -------------------------------------------------------------------------------


def _kind(path: Path) -> str:
    """'file', 'folder' or 'missing'. Stat errors (e.g. an unreadable parent) become InputError."""
    try:
        if path.is_dir():
            return "folder"
        return "file" if path.exists() else "missing"
    except OSError as e:
        raise InputError(f"{path}: cannot access ({e.strerror or e})") from e


def _read_lines(path: Path) -> list[bytes]:
    kind = _kind(path)
    if kind == "missing":
        raise InputError(f"{path}: no such file")
    if kind == "folder":
        raise InputError(f"{path}: is a folder, expected a .jsonl file")
    try:
        data = path.read_bytes()
    except PermissionError as e:
        raise InputError(f"{path}: not readable (permission denied)") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from e
    # Split bytes, not text, so a bad byte is reported on its own line. A CRLF's "\r" needs
    # no handling: JSON counts it as whitespace.
    return data.removeprefix(BOM).split(b"\n")


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
        raise InputError(f"{where}: not valid UTF-8 ({bad})") from e


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    except (
        ValueError,
        RecursionError,
    ) as e:  # too deeply nested, or an integer over Python's digit limit
        raise InputError(f"{where}: invalid JSON ({one_line(e)})") from e


# ---- validating ----------------------------------------------------------------------------


def _format_of(obj: Any, where: str) -> str:
    """Which of the formats a parsed line uses; extra keys are ignored, as in mlx-lm."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: each line must be a JSON object ({_got(obj)})")
    found = ["messages"] if "messages" in obj else []
    if "prompt" in obj:
        found += [
            f"prompt/{key}"
            for key in ("completion", "privileged_context", "teacher_template")
            if key in obj
        ]
    if "prompt" in obj and not found and "teacher_system" in obj:
        found = [OWN_SYSTEM]
    if len(found) > 1:
        both = f"{found[0]} and {found[1]}"
        raise InputError(f"{where}: ambiguous line: it has the keys of both {both}; keep one")
    if not found:
        keys = (
            ", ".join(_show(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "") or "none"
        )
        raise InputError(
            f'{where}: unknown format: expected the keys "messages", "prompt" + "completion", '
            f'"prompt" + "privileged_context", "prompt" + "teacher_template" or "prompt" + "teacher_system" '
            f"(got keys: {keys})"
        )
    return found[0]


def _example(obj: dict, fmt: str, where: str) -> Example:
    example = _demonstrated(obj, fmt, where)
    if "teacher_system" not in obj:
        return example
    return dataclasses.replace(
        example, teacher_system=_demonstration(obj["teacher_system"], '"teacher_system"', where)
    )


def _demonstrated(obj: dict, fmt: str, where: str) -> Example:
    if fmt == OWN_SYSTEM:
        return Example(
            _prompt(obj["prompt"], where),
            "",
            _tools(obj.get("tools"), where),
            where,
            "{question}",
            {},
        )
    if fmt == "messages":
        messages = _messages(obj["messages"], "messages", where)
        last, n = messages[-1], len(messages) - 1
        if last["role"] != "assistant":
            raise InputError(
                f'{where}: messages[{n}].role must be "assistant", since the last message is '
                f"the demonstration (got {_show(last['role'])})"
            )
        demonstration = _demonstration(
            last.get("content", _MISSING), f"messages[{n}].content", where
        )
        prompt = [_tool_call_turn(m) for m in messages[:-1]]
        if not prompt:
            raise InputError(
                f'{where}: "messages" has no prompt: put a user message before the last message'
            )
        _check_prompt_end(prompt, "messages", where)
    elif fmt == OWN_TEMPLATE:
        template, context = _teacher_context(obj, where)
        return Example(
            _prompt(obj["prompt"], where),
            "",
            _tools(obj.get("tools"), where),
            where,
            template,
            context,
        )
    else:
        key = fmt.removeprefix("prompt/")
        prompt = _prompt(obj["prompt"], where)
        demonstration = _demonstration(obj[key], f'"{key}"', where)
    return Example(prompt, demonstration, _tools(obj.get("tools"), where), where)


def _teacher_context(obj: dict, where: str) -> tuple[str, dict]:
    template, context = obj["teacher_template"], obj.get("context", _MISSING)
    if not isinstance(template, str) or "{question}" not in template:
        raise InputError(
            f'{where}: "teacher_template" must be a string with {{question}} ({_got(template)})'
        )
    if not isinstance(context, dict):
        raise InputError(
            f'{where}: "context" must be an object of {", ".join(CONTEXT_SLOTS)} ({_got(context)})'
        )
    for key, value in context.items():
        if key not in CONTEXT_SLOTS:
            raise InputError(
                f"{where}: context key {_show(key)} is not one of {', '.join(CONTEXT_SLOTS)}"
            )
        _demonstration(value, f"context.{key}", where)
    for slot in ("demonstration", *CONTEXT_SLOTS):
        if "{" + slot + "}" in template and slot not in context:
            raise InputError(
                f'{where}: "teacher_template" has {{{slot}}} but "context" has no {_show(slot)}'
            )
    return template, context


def _prompt(value: Any, where: str) -> list[dict]:
    if isinstance(value, list):
        messages = check_messages(value, "prompt", where)
        _check_prompt_end(messages, "prompt", where)
        return messages
    if not isinstance(value, str) or not value.strip():
        expected = "a non-empty string or a list of messages"
        raise InputError(f'{where}: "prompt" must be {expected} ({_got(value)})')
    return [{"role": "user", "content": value}]


def check_messages(value: Any, field: str, where: str) -> list[dict]:
    """A non-empty list of chat messages with known roles and string contents, else InputError;
    tool-call turns read as chat templates take them (`_tool_call_turn`)."""
    return [_tool_call_turn(m) for m in _messages(value, field, where)]


def _messages(value: Any, field: str, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise InputError(f'{where}: "{field}" must be a non-empty list of messages ({_got(value)})')
    for i, message in enumerate(value):
        _check_message(message, f"{field}[{i}]", where)
    return value


def _tool_call_turn(message: dict) -> dict:
    """An assistant turn that calls tools as OpenAI clients send it, the way chat templates read it
    (as mlx-lm's server does): no content (null or absent) becomes "", and each call's
    `function.arguments` given as a JSON string becomes the object it holds (a string that is not
    a JSON object stays as it is). Other messages are returned as they are."""
    if message.get("role") != "assistant" or "tool_calls" not in message:
        return message
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except (ValueError, RecursionError):
                arguments = None
            if isinstance(arguments, dict):
                call = {**call, "function": {**function, "arguments": arguments}}
        calls.append(call)
    return {**message, "content": message.get("content") or "", "tool_calls": calls}


def _check_message(message: Any, field: str, where: str) -> None:
    if not isinstance(message, dict):
        raise InputError(
            f'{where}: {field} must be an object with "role" and "content" ({_got(message)})'
        )
    role = message.get("role", _MISSING)
    if not isinstance(role, str):
        raise InputError(f"{where}: {field}.role must be a string ({_got(role)})")
    if role not in ROLES:
        raise InputError(f"{where}: {field}.role {_show(role)} is not one of {', '.join(ROLES)}")
    content = message.get("content", _MISSING)
    if role == "assistant" and "tool_calls" in message:
        if not isinstance(message["tool_calls"], list):
            raise InputError(
                f"{where}: {field}.tool_calls must be a list ({_got(message['tool_calls'])})"
            )
        # A turn that only calls tools has no text: OpenAI-style data sends null or omits it.
        if content is None or content is _MISSING:
            return
    if not isinstance(content, str):
        raise InputError(f"{where}: {field}.content must be a string ({_got(content)})")


def _check_prompt_end(prompt: list[dict], field: str, where: str) -> None:
    role = prompt[-1]["role"]
    if role != "user":
        raise InputError(
            f'{where}: {field}[{len(prompt) - 1}].role must be "user", since the prompt must end '
            f"with a user message (got {_show(role)})"
        )


def _demonstration(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{where}: {field} must be a non-empty string ({_got(value)})")
    return value


def _tools(value: Any, where: str) -> list | None:
    if value is None:  # absent, or null as dataset exports write missing columns
        return None
    if not isinstance(value, list):
        raise InputError(f'{where}: "tools" must be a list of objects ({_got(value)})')
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise InputError(f"{where}: tools[{i}] must be an object ({_got(tool)})")
    return value


def _show(value: Any, limit: int = 40) -> str:
    """A short JSON rendering for messages; escapes newlines so the message stays one line."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _got(value: Any) -> str:
    """'got a number', 'got an empty string', 'it is missing'... for the end of a message."""
    if value is _MISSING:
        return "it is missing"
    if isinstance(value, str):
        return (
            "got a string"
            if value.strip()
            else "got a blank string"
            if value
            else "got an empty string"
        )
    if isinstance(value, list) and not value:
        return "got an empty list"
    return f"got {_JSON_NAMES.get(type(value), type(value).__name__)}"
