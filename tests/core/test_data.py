"""Tests for mlx_sdft.core.data: the three line formats, the folder form, and every input error.

Run: pytest -q tests/core/test_data.py   (offline, no model, under a second)
"""

import json
from pathlib import Path
from unittest.mock import Mock

import pytest

from mlx_sdft.core.data import Example, load_dataset, load_examples
from mlx_sdft.errors import InputError

USER = {"role": "user", "content": "What is 2+2?"}
MESSAGES_LINE = {"messages": [USER, {"role": "assistant", "content": "4"}]}
COMPLETION_LINE = {"prompt": "What is 2+2?", "completion": "4"}
PRIVILEGED_LINE = {"prompt": "What is 2+2?", "privileged_context": "4"}


def write(path: Path, *lines: object) -> Path:
    """Write one line per item: dicts/lists as JSON, strings as they are."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def error(fn, *args) -> str:
    with pytest.raises(InputError) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message  # the CLI shows it as a single line
    return message


def msgs(*messages: dict) -> dict:
    return {"messages": list(messages)}


def asst(content: object = "4", **extra: object) -> dict:
    return {"role": "assistant", "content": content, **extra}


def as_user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- formats -------------------------------------------------------------------------------


def test_messages_format(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    call = asst(None, tool_calls=[{"function": {"name": "add"}}])
    bare_call = {"role": "assistant", "tool_calls": []}  # content may also be left out
    result = {"role": "tool", "content": "4", "tool_call_id": "c1", "name": "add"}
    tools = [{"type": "function", "function": {"name": "add"}}]
    prompt = [system, USER, call, result, bare_call, USER]
    path = write(
        tmp_path / "d.jsonl",
        {"messages": [*prompt, asst("It is 4.")], "tools": tools},
        MESSAGES_LINE,
    )
    first, second = load_examples(path)
    read = [
        system,
        USER,
        {**call, "content": ""},
        result,
        {**bare_call, "content": ""},
        USER,
    ]  # no text: ""
    assert first == Example(read, "It is 4.", tools, f"{path}:1")
    assert first.prompt[3] == result  # extra keys such as tool_call_id are kept
    assert second == Example([USER], "4", None, f"{path}:2")


def test_tool_call_turns_are_read_as_chat_templates_take_them(tmp_path):
    """As OpenAI clients send a tool loop (and mlx-lm's server reads it): an assistant turn that only
    calls tools has null content, read as "", and each call's arguments are a JSON string, read as
    the object it holds; a string that is not a JSON object stays as it is. `serve` reads the same."""

    def call(arguments):
        return {
            "id": "c1",
            "type": "function",
            "function": {"name": "weather", "arguments": arguments},
        }

    given = [
        USER,
        asst(
            None,
            tool_calls=[
                call('{"city": "Paris", "days": [1, 2]}'),
                call("{not json"),
                call("[1]"),
                call({"city": "Rome"}),
            ],
        ),
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        USER,
    ]
    path = write(tmp_path / "d.jsonl", {"prompt": given, "completion": "Sunny."})
    [example] = load_examples(path)
    turn = example.prompt[1]
    assert turn["content"] == "" and [c["function"]["arguments"] for c in turn["tool_calls"]] == [
        {"city": "Paris", "days": [1, 2]},
        "{not json",
        "[1]",
        {"city": "Rome"},
    ]
    assert turn["tool_calls"][0]["id"] == "c1" and example.prompt[2:] == given[2:]
    assert given[1]["content"] is None  # what was read is not changed in place


def test_prompt_completion_format(tmp_path):
    turns = [{"role": "developer", "content": "Answer in French."}, USER]
    path = write(
        tmp_path / "d.jsonl", COMPLETION_LINE, {"prompt": turns, "completion": "quatre", "id": 7}
    )
    first, second = load_examples(path)
    assert first == Example(as_user("What is 2+2?"), "4", None, f"{path}:1")
    assert second == Example(turns, "quatre", None, f"{path}:2")  # unknown key "id" ignored


def test_privileged_context_format(tmp_path):
    tools = [{"name": "calc"}]
    line = {"prompt": [USER], "privileged_context": "Four.", "tools": tools}
    path = write(tmp_path / "d.jsonl", PRIVILEGED_LINE, line)
    first, second = load_examples(path)
    assert first == Example(as_user("What is 2+2?"), "4", None, f"{path}:1")
    assert second == Example([USER], "Four.", tools, f"{path}:2")


def test_demonstration_kept_verbatim_and_null_tools(tmp_path):
    path = write(
        tmp_path / "d.jsonl", {"prompt": "q", "completion": "  two\nlines \n", "tools": None}
    )
    assert load_examples(path) == [Example(as_user("q"), "  two\nlines \n", None, f"{path}:1")]


def test_blank_lines_skipped_but_counted(tmp_path):
    path = write(tmp_path / "d.jsonl", "", "   \t", COMPLETION_LINE, "", "")
    assert [e.where for e in load_examples(path)] == [f"{path}:3"]


def test_bom_and_crlf(tmp_path):
    path, line = tmp_path / "d.jsonl", json.dumps(COMPLETION_LINE).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n\r\n" + line + b"\r\n")
    examples = load_examples(path)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]
    assert examples[0] == Example(as_user("What is 2+2?"), "4", None, f"{path}:1")


def test_very_long_line(tmp_path):
    demo = "x" * 10_000_000
    path = write(tmp_path / "d.jsonl", {"prompt": "q", "completion": demo})
    assert load_examples(path)[0].demonstration == demo


# ---- folders and files ---------------------------------------------------------------------


def test_dataset_from_file_or_train_only_folder(tmp_path):
    path = write(tmp_path / "d.jsonl", COMPLETION_LINE)
    assert load_dataset(str(path)) == {
        "train": [Example(as_user("What is 2+2?"), "4", None, f"{path}:1")]
    }
    path = write(tmp_path / "train.jsonl", MESSAGES_LINE)
    assert load_dataset(tmp_path) == {"train": [Example([USER], "4", None, f"{path}:1")]}


def test_dataset_folder_with_all_splits(tmp_path):
    write(tmp_path / "train.jsonl", COMPLETION_LINE, COMPLETION_LINE)
    write(tmp_path / "valid.jsonl", PRIVILEGED_LINE)
    write(tmp_path / "test.jsonl", MESSAGES_LINE)
    splits = load_dataset(tmp_path)
    assert list(splits) == ["train", "valid", "test"]
    assert [len(v) for v in splits.values()] == [2, 1, 1]
    assert splits["test"] == [Example([USER], "4", None, f"{tmp_path / 'test.jsonl'}:1")]


def test_dataset_errors(tmp_path):
    assert error(load_dataset, tmp_path / "nope") == f"{tmp_path / 'nope'}: no such file or folder"
    assert error(load_dataset, tmp_path) == f"{tmp_path}: folder has no train.jsonl"
    (tmp_path / "train.jsonl").mkdir()
    assert (
        error(load_dataset, tmp_path)
        == f"{tmp_path / 'train.jsonl'}: is a folder, expected a .jsonl file"
    )
    (tmp_path / "train.jsonl").rmdir()
    write(tmp_path / "train.jsonl", COMPLETION_LINE)
    (tmp_path / "valid.jsonl").write_text("")
    assert error(load_dataset, tmp_path) == f"{tmp_path / 'valid.jsonl'}: no examples"


def test_file_errors(tmp_path):
    assert (
        error(load_examples, tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'}: no such file"
    )
    assert error(load_examples, tmp_path) == f"{tmp_path}: is a folder, expected a .jsonl file"
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert error(load_examples, empty) == f"{empty}: no examples"
    empty.write_bytes(b"\xef\xbb\xbf\n  \r\n\t\n")
    assert error(load_examples, empty) == f"{empty}: no examples"


@pytest.mark.parametrize(
    "exc, expected",
    [
        (PermissionError(13, "Permission denied"), "not readable (permission denied)"),
        (IsADirectoryError(21, "Is a directory"), "cannot read (Is a directory)"),
        (OSError(5, "Input/output error"), "cannot read (Input/output error)"),
    ],
)
def test_unreadable_file(tmp_path, monkeypatch, exc, expected):
    # Tests may run as root, where chmod 000 does not stop reads, so fake the failure.
    path = write(tmp_path / "d.jsonl", COMPLETION_LINE)
    monkeypatch.setattr(Path, "read_bytes", Mock(side_effect=exc))
    assert error(load_examples, path) == f"{path}: {expected}"


def test_unstattable_path(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "is_dir", Mock(side_effect=PermissionError(13, "Permission denied")))
    path = tmp_path / "d.jsonl"
    assert error(load_dataset, path) == f"{path}: cannot access (Permission denied)"


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        json.dumps(COMPLETION_LINE).encode() + b'\n\n{"prompt": "caf\xe9", "completion": "x"}\n'
    )
    assert error(load_examples, path) == f"{path}:3: not valid UTF-8 (byte 0xe9 at column 16)"


# ---- line errors ---------------------------------------------------------------------------


def test_invalid_json(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"prompt": "a" "completion": "b"}')
    assert (
        error(load_examples, path)
        == f"{path}:1: invalid JSON (Expecting ',' delimiter at column 16)"
    )
    path = write(tmp_path / "d.jsonl", COMPLETION_LINE, "[" * 100_000 + "]" * 100_000)
    assert error(load_examples, path).startswith(
        f"{path}:2: invalid JSON (maximum recursion depth exceeded"
    )
    path = write(
        tmp_path / "d.jsonl", '{"prompt": "q", "completion": "a", "n": ' + "9" * 5000 + "}"
    )
    assert error(load_examples, path).startswith(f"{path}:1: invalid JSON (Exceeds the limit")


def test_mixed_formats(tmp_path):
    path = write(tmp_path / "d.jsonl", "", COMPLETION_LINE, MESSAGES_LINE)
    expected = f"{path}:3: mixed formats: line 2 is prompt/completion, this line is messages"
    assert error(load_examples, path) == expected
    path = write(tmp_path / "d.jsonl", PRIVILEGED_LINE, COMPLETION_LINE)
    expected = f"{path}:2: mixed formats: line 1 is prompt/privileged_context, this line is prompt/completion"
    assert error(load_examples, path) == expected


def test_mixed_formats_reported_before_field_errors(tmp_path):
    path = write(tmp_path / "d.jsonl", MESSAGES_LINE, {"prompt": 5, "completion": ""})
    assert error(load_examples, path).startswith(f"{path}:2: mixed formats")


UNKNOWN = (
    'unknown format: expected the keys "messages", "prompt" + "completion", '
    '"prompt" + "privileged_context", "prompt" + "teacher_template" or "prompt" + "teacher_system" (got keys: '
)
BOTH = "ambiguous line: it has the keys of both"
BAD_PROMPT = '"prompt" must be a non-empty string or a list of messages '
END_USER = 'must be "user", since the prompt must end with a user message (got '
ROLES = "assistant, developer, system, tool, user"
NON_EMPTY = "must be a non-empty string"
LAST = 'must be "assistant", since the last message is the demonstration (got '

BAD_LINES = [
    # not an object, or no known format
    ([1, 2], "each line must be a JSON object (got a list)"),
    ('"text"', "each line must be a JSON object (got a string)"),
    ("null", "each line must be a JSON object (got null)"),
    ({"prompt": "q", "answer": "a"}, UNKNOWN + '"prompt", "answer")'),
    ({}, UNKNOWN + "none)"),
    ({str(i): i for i in range(10)}, UNKNOWN + '"0", "1", "2", "3", "4", "5", "6", "7", ...)'),
    (MESSAGES_LINE | COMPLETION_LINE, f"{BOTH} messages and prompt/completion; keep one"),
    (
        PRIVILEGED_LINE | {"completion": "4"},
        f"{BOTH} prompt/completion and prompt/privileged_context; keep one",
    ),
    # the demonstration
    ({"prompt": "q", "completion": None}, '"completion" must be a non-empty string (got null)'),
    (
        {"prompt": "q", "completion": ""},
        '"completion" must be a non-empty string (got an empty string)',
    ),
    (
        {"prompt": "q", "completion": " \n\t"},
        '"completion" must be a non-empty string (got a blank string)',
    ),
    ({"prompt": "q", "completion": 4}, '"completion" must be a non-empty string (got a number)'),
    (
        {"prompt": "q", "privileged_context": ["a"]},
        '"privileged_context" must be a non-empty string (got a list)',
    ),
    (
        {"prompt": "q", "privileged_context": {}},
        '"privileged_context" must be a non-empty string (got an object)',
    ),
    # the prompt of the prompt/completion and prompt/privileged_context formats
    ({"prompt": "", "completion": "a"}, BAD_PROMPT + "(got an empty string)"),
    ({"prompt": "  ", "completion": "a"}, BAD_PROMPT + "(got a blank string)"),
    ({"prompt": {"a": 1}, "completion": "a"}, BAD_PROMPT + "(got an object)"),
    ({"prompt": True, "completion": "a"}, BAD_PROMPT + "(got a boolean)"),
    (
        {"prompt": [], "completion": "a"},
        '"prompt" must be a non-empty list of messages (got an empty list)',
    ),
    (
        {"prompt": ["hi"], "completion": "a"},
        'prompt[0] must be an object with "role" and "content" (got a string)',
    ),
    (
        {"prompt": [{"role": "user"}], "privileged_context": "a"},
        "prompt[0].content must be a string (it is missing)",
    ),
    ({"prompt": [USER, asst()], "completion": "a"}, f'prompt[1].role {END_USER}"assistant")'),
    # messages
    ({"messages": "hi"}, '"messages" must be a non-empty list of messages (got a string)'),
    ({"messages": []}, '"messages" must be a non-empty list of messages (got an empty list)'),
    (msgs(USER), f'messages[0].role {LAST}"user")'),
    (msgs(USER, asst(), USER), f'messages[2].role {LAST}"user")'),
    (msgs(USER, asst("")), f"messages[1].content {NON_EMPTY} (got an empty string)"),
    (msgs(USER, asst(" \n")), f"messages[1].content {NON_EMPTY} (got a blank string)"),
    (msgs(USER, asst(None, tool_calls=[])), f"messages[1].content {NON_EMPTY} (got null)"),
    (
        msgs(USER, {"role": "assistant", "tool_calls": []}),
        f"messages[1].content {NON_EMPTY} (it is missing)",
    ),
    (msgs(asst()), '"messages" has no prompt: put a user message before the last message'),
    (msgs({"role": "system", "content": "s"}, asst()), f'messages[0].role {END_USER}"system")'),
    (
        msgs(USER, {"role": "robot", "content": ""}, USER, asst()),
        f'messages[1].role "robot" is not one of {ROLES}',
    ),
    (msgs({"content": "x"}, asst()), "messages[0].role must be a string (it is missing)"),
    (msgs({"role": 5, "content": "x"}, asst()), "messages[0].role must be a string (got a number)"),
    (
        msgs({"role": "user", "content": [{"text": "hi"}]}, asst()),
        "messages[0].content must be a string (got a list)",
    ),
    (
        msgs({"role": "user", "tool_calls": []}, asst()),
        "messages[0].content must be a string (it is missing)",
    ),
    (
        msgs(USER, asst(None, tool_calls={}), USER, asst()),
        "messages[1].tool_calls must be a list (got an object)",
    ),
    (msgs(USER, asst(None), USER, asst()), "messages[1].content must be a string (got null)"),
    # tools
    (MESSAGES_LINE | {"tools": "calc"}, '"tools" must be a list of objects (got a string)'),
    (MESSAGES_LINE | {"tools": {}}, '"tools" must be a list of objects (got an object)'),
    (COMPLETION_LINE | {"tools": [{"name": "a"}, 3]}, "tools[1] must be an object (got a number)"),
]


@pytest.mark.parametrize("line, expected", BAD_LINES)
def test_bad_line(tmp_path, line, expected):
    # The blank first line checks that line numbers count it.
    path = write(tmp_path / "demos.jsonl", "", line)
    assert error(load_examples, path) == f"{path}:2: {expected}"


def test_long_values_are_shortened_in_messages(tmp_path):
    path = write(tmp_path / "d.jsonl", msgs({"role": "x" * 1000 + "\n", "content": "c"}, asst()))
    assert (
        error(load_examples, path)
        == f'{path}:1: messages[0].role "{"x" * 36}... is not one of {ROLES}'
    )


OWN_LINE = {
    "prompt": "What is 2+2?",
    "teacher_template": "{question} You said {answer}; {feedback}",
    "context": {"answer": "5", "feedback": "count again."},
}


def test_own_teacher_template_format_mixes_with_any(tmp_path):
    path = write(
        tmp_path / "d.jsonl",
        COMPLETION_LINE,
        OWN_LINE,
        MESSAGES_LINE | {"messages": [USER, asst()]},
    )
    with pytest.raises(
        InputError, match="mixed formats: line 1 is prompt/completion, this line is messages"
    ):
        load_examples(path)  # the lesson line mixes, the other two still may not
    first, second = load_examples(write(tmp_path / "e.jsonl", COMPLETION_LINE, OWN_LINE))
    assert first.teacher_template is None and first.context is None
    assert second == Example(
        as_user("What is 2+2?"),
        "",
        None,
        f"{tmp_path / 'e.jsonl'}:2",
        OWN_LINE["teacher_template"],
        OWN_LINE["context"],
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"teacher_template": "no question slot"},
            '"teacher_template" must be a string with {question} (got a string)',
        ),
        ({"context": None}, '"context" must be an object of answer, feedback, followup (got null)'),
        (
            {"context": {"answer": "5", "mood": "x"}},
            'context key "mood" is not one of answer, feedback, followup',
        ),
        (
            {"context": {"answer": "5", "feedback": " "}},
            "context.feedback must be a non-empty string (got a blank string)",
        ),
        (
            {"context": {"answer": "5"}},
            '"teacher_template" has {feedback} but "context" has no "feedback"',
        ),
        (
            {"completion": "4"},
            "ambiguous line: it has the keys of both prompt/completion and prompt/teacher_template; keep one",
        ),
    ],
)
def test_own_teacher_template_errors(tmp_path, change, message):
    path = write(tmp_path / "d.jsonl", OWN_LINE | change)
    assert error(load_examples, path) == f"{path}:1: {message}"
