"""The experience store (store/db.py, store/lessons.py): schema and WAL, redaction, lessons as
training examples, export/import in the formats `train` reads, two writing processes, and the
`teach` / `lessons` commands."""

import json
import re
import sqlite3
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.config import FEEDBACK_TEMPLATE, HINDSIGHT_TEMPLATE, TEACHER_TEMPLATE
from mlx_sdft.core.data import Example, load_examples
from mlx_sdft.core.prompts import teacher_messages
from mlx_sdft.errors import InputError
from mlx_sdft.store import lessons, versions
from mlx_sdft.store.db import FILENAME, SCHEMA_VERSION, Store

runner = CliRunner()
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def _exchange(store, messages=MESSAGES, answer="5", **kw):
    args = dict(
        messages=messages,
        answer=answer,
        model="m",
        version=0,
        sampling={"temperature": 0.0},
        finish_reason="stop",
        prompt_tokens=7,
        completion_tokens=1,
    )
    return store.add_exchange(**{**args, **kw})


def _file_bytes(home) -> bytes:
    return b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith(FILENAME))


def test_new_store_is_wal_at_the_schema_version_and_reopens(tmp_path):
    with Store(tmp_path) as store:
        id = _exchange(store)
    con = sqlite3.connect(tmp_path / FILENAME)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for path in tmp_path.iterdir():  # store.db, -wal, -shm: only the owner may read them
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    con.close()
    with Store(tmp_path) as store:  # a second open migrates nothing and keeps the rows
        assert store.exchange(id)["answer"] == "5"


def test_a_new_home_is_private(tmp_path):
    with Store(tmp_path / "a" / "home"):
        pass
    assert (tmp_path / "a" / "home").stat().st_mode & 0o077 == 0


def test_a_newer_or_foreign_file_is_an_input_error(tmp_path):
    con = sqlite3.connect(tmp_path / FILENAME)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(InputError, match="newer than this mlx-sdft reads"):
        Store(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / FILENAME).write_bytes(b"not a database at all" * 100)
    with pytest.raises(InputError, match="not a usable store"):
        Store(other)


def test_redaction_masks_before_anything_is_written(tmp_path):
    secret = "555-0123"
    with Store(tmp_path, redact=[r"\d{3}-\d{4}"]) as store:
        id = _exchange(
            store, [{"role": "user", "content": f"call me at {secret}"}], answer=f"ok, {secret}"
        )
        store.add_lesson(
            **lessons.from_exchange(
                store.exchange(id), "feedback", f"not {secret}", FEEDBACK_TEMPLATE
            )
        )
        row, lesson = store.exchange(id), store.lessons()[0]
    assert (
        row["messages"][0]["content"] == "call me at [REDACTED]"
        and row["answer"] == "ok, [REDACTED]"
    )
    assert lesson["text"] == "not [REDACTED]" and lesson["answer"] == "ok, [REDACTED]"
    assert secret.encode() not in _file_bytes(tmp_path)


def test_purge_and_forget_leave_no_text_in_the_files(tmp_path):
    with Store(tmp_path) as store:
        id = _exchange(
            store, [{"role": "user", "content": "my-private-question"}], answer="my-private-answer"
        )
        store.add_lesson(
            **lessons.from_exchange(store.exchange(id), "demonstration", "my-private-demo")
        )
        assert store.forget_exchanges() == 1 and store.exchanges() == []
        assert store.lessons()[0]["prompt"] == [
            {"role": "user", "content": "my-private-question"}
        ]  # lessons keep a copy
        assert store.purge_lessons() == 1 and store.lessons() == []
        assert (
            store.add_lesson(kind="import", prompt=MESSAGES, text="4") == 2
        )  # ids are never reused
    data = _file_bytes(tmp_path)
    for text in (b"my-private-question", b"my-private-answer", b"my-private-demo"):
        assert text not in data


def test_delete_leaves_no_text_in_the_files_while_the_server_has_them_open(tmp_path):
    """The server keeps its connection open: a deleted lesson's text must not stay in the WAL
    (nor in store.db) until it stops."""
    with Store(tmp_path) as server, Store(tmp_path) as teach:
        id = server.add_lesson(
            kind="import", prompt=[{"role": "user", "content": "q"}], text="my-deleted-demo " * 40
        )
        assert server.lesson(id)["text"].startswith(
            "my-deleted-demo"
        )  # read once, as the server would
        assert b"my-deleted-demo" in _file_bytes(tmp_path)
        assert teach.delete_lesson(id)
        assert b"my-deleted-demo" not in _file_bytes(tmp_path)
        assert server.lesson(id)["state"] == "deleted"


def test_redaction_reaches_every_text_in_the_messages(tmp_path):
    """Tool-call arguments, content parts and tool results are texts too; roles and types are not."""
    secret = "555-0123"
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "dial", "arguments": f'{{"number": "{secret}"}}'},
    }
    messages = [
        {"role": "user", "content": f"call {secret}"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": f"{secret} is busy"},
        {"role": "user", "content": "and now?"},
    ]
    with Store(tmp_path, redact=[r"\d{3}-\d{4}", "function|tool|user"]) as store:
        row = store.exchange(_exchange(store, messages, answer="ok"))
        lesson = store.lesson(
            store.add_lesson(**lessons.from_exchange(row, "demonstration", "fine"))
        )
    for stored in (row["messages"], lesson["prompt"]):
        assert stored[1]["tool_calls"][0]["function"]["arguments"] == '{"number": "[REDACTED]"}'
        assert stored[1]["tool_calls"][0]["type"] == "function" and [m["role"] for m in stored] == [
            "user",
            "assistant",
            "tool",
            "user",
        ]
        assert (
            stored[2]["content"] == "[REDACTED] is busy"
            and stored[0]["content"] == "call [REDACTED]"
        )
    assert secret.encode() not in _file_bytes(tmp_path)


def test_a_damaged_page_is_one_line_not_a_traceback(tmp_path):
    home = tmp_path / "home"
    with Store(home) as store:
        for i in range(40):
            _exchange(store, [{"role": "user", "content": f"question {i} " * 50}])
    data = bytearray((home / FILENAME).read_bytes())
    page = 4096
    for start in range(2 * page, len(data), page):  # every table page but the schema's
        data[start + 8 : start + 208] = b"\x07" * 200
    (home / FILENAME).write_bytes(bytes(data))
    with Store(home) as store, pytest.raises(InputError, match="not a usable store"):
        store.exchanges()
    for args in (
        ["exchanges", "list"],
        ["serve", "--model", "no/such-model"],
    ):  # serve: before any model loads
        result = _run(*args, "--home", home)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
        assert f"{home / FILENAME}: not a usable store" in result.stderr, result.stderr


def test_delete_leaves_a_tombstone_and_states_change(tmp_path):
    with Store(tmp_path) as store:
        a, b = store.add_lessons([{"kind": "import", "prompt": MESSAGES, "text": "4"}] * 2)
        assert store.delete_lesson(a) and not store.delete_lesson(a)
        store.set_state([a, b], "learned")  # a deleted lesson stays deleted
        tomb, kept = store.lesson(a), store.lesson(b)
    assert (tomb["state"], tomb["text"], tomb["prompt"], tomb["kind"]) == (
        "deleted",
        "",
        [],
        "import",
    )
    assert kept["state"] == "learned"


def test_lessons_become_the_examples_the_trainer_reads(tmp_path):
    with Store(tmp_path) as store:
        id = _exchange(
            store,
            [
                *MESSAGES,
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 3+3?"},
            ],
            answer="7",
        )
        ex = store.exchange(id)
        ids = store.add_lessons(
            [
                lessons.from_exchange(ex, "demonstration", "6"),
                lessons.from_exchange(ex, "feedback", "Off by one.", FEEDBACK_TEMPLATE),
                lessons.from_exchange(ex, "hindsight", "Wrong again!", HINDSIGHT_TEMPLATE),
            ]
        )
        demo, feedback, hindsight = (lessons.to_example(store.lesson(i)) for i in ids)
    assert demo == Example(ex["messages"], "6", None, f"store:lesson/{ids[0]}")
    assert (feedback.demonstration, feedback.context) == (
        "",
        {"answer": "7", "feedback": "Off by one."},
    )
    last = teacher_messages(feedback, TEACHER_TEMPLATE)[-1][
        "content"
    ]  # the lesson's own template wins
    assert last == FEEDBACK_TEMPLATE.format(question="And 3+3?", answer="7", feedback="Off by one.")
    last = teacher_messages(hindsight, TEACHER_TEMPLATE)[-1]["content"]
    assert last == HINDSIGHT_TEMPLATE.format(
        question="And 3+3?", answer="7", followup="Wrong again!"
    )
    assert (
        teacher_messages(demo, TEACHER_TEMPLATE)[:-1] == ex["messages"][:-1]
    )  # history kept, last turn replaced


def test_export_reads_back_as_the_same_examples_and_imports(tmp_path):
    with Store(tmp_path / "a") as store:
        ex = store.exchange(
            _exchange(store, tools=[{"type": "function", "function": {"name": "add"}}])
        )
        store.add_lessons(
            [
                lessons.from_exchange(ex, "demonstration", "4"),
                lessons.from_exchange(ex, "feedback", "It is 4.", FEEDBACK_TEMPLATE),
            ]
        )
        assert lessons.export(store, tmp_path / "l.jsonl") == 2
        before = [lessons.to_example(r) for r in store.lessons()]
    after = load_examples(tmp_path / "l.jsonl")  # the formats `train --data` reads, in one file
    strip = lambda e: (e.prompt, e.demonstration, e.tools, e.teacher_template, e.context)  # noqa: E731
    assert list(map(strip, after)) == list(map(strip, before))
    with Store(tmp_path / "b") as other:
        assert lessons.import_file(other, tmp_path / "l.jsonl") == [1, 2]
        assert [(r["kind"], r["text"], r["answer"]) for r in other.lessons()] == [
            ("import", "4", None),
            ("feedback", "It is 4.", "5"),
        ]


def test_import_checks_every_line_before_storing_any(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt": "Hi", "completion": "Hello"})
        + "\n"
        + json.dumps({"prompt": "Hi"})
        + "\n"
    )
    with Store(tmp_path) as store:
        with pytest.raises(InputError, match=rf"{re.escape(str(bad))}:2: unknown format"):
            lessons.import_file(store, bad)
        assert store.lessons() == []


WRITER = """
import sys
from mlx_sdft.store.db import Store
store = Store(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.add_exchange(messages=[{"role": "user", "content": f"{sys.argv[2]} {i}"}], answer="a", model="m",
                       version=0, sampling={}, finish_reason="stop", prompt_tokens=1, completion_tokens=1)
    store.add_lesson(kind="import", prompt=[{"role": "user", "content": "q"}], text=f"{sys.argv[2]} {i}")
"""


def test_two_processes_write_at_once_without_losing_a_row(tmp_path):
    n = 150
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, str(n)])
        for name in "ab"
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with Store(tmp_path) as store:
        assert len(store.exchanges()) == 2 * n and len(store.lessons()) == 2 * n
        assert {r["text"] for r in store.lessons()} == {f"{c} {i}" for c in "ab" for i in range(n)}
    assert (
        sqlite3.connect(tmp_path / FILENAME).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    )


def test_current_version_pointer(tmp_path):
    assert versions.current(tmp_path) == 0
    with pytest.raises(InputError, match="no adapter folder"):
        versions.set_current(tmp_path, 3) or versions.current(tmp_path)
    versions.version_dir(tmp_path, 3).mkdir(parents=True)
    (versions.version_dir(tmp_path, 3) / "adapter_config.json").write_text("{}")
    assert versions.current(tmp_path) == 3 and versions.version_dir(tmp_path, 3).name == "0003"
    (tmp_path / versions.CURRENT).write_text('{"version": "x"}')
    with pytest.raises(InputError, match="integer"):
        versions.current(tmp_path)


# ---- the commands ----------------------------------------------------------------------------


def _run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_teach_and_lessons_round_trip(tmp_path):
    home = tmp_path / "home"
    with Store(home) as store:
        id = _exchange(store)
    result = _run("teach", "--home", home, "--list")
    assert (
        result.exit_code == 0
        and result.stdout.startswith(id)
        and "'What is 2+2?' -> '5'" in result.stdout
    )
    assert (
        _run("teach", id, "--home", home, "--answer", "4").stdout.strip()
        == f"lesson 1 (demonstration) on exchange {id}"
    )
    assert _run("teach", id, "--home", home, "--feedback", "Count again.").exit_code == 0
    listed = json.loads(_run("lessons", "--home", home, "--json").stdout)
    assert [(r["kind"], r["text"], r["exchange_id"]) for r in listed] == [
        ("demonstration", "4", id),
        ("feedback", "Count again.", id),
    ]
    shown = _run("lessons", "show", "2", "--home", home).stdout
    assert (
        "model's answer: 5" in shown and "This is feedback on that response:\nCount again." in shown
    )
    out = tmp_path / "lessons.jsonl"
    assert _run("lessons", "--home", home, "--export", out).exit_code == 0
    assert _run("teach", "--home", tmp_path / "other", "--import", out).stdout.startswith(
        "imported 2 lessons (1..2)"
    )
    one = tmp_path / "one.jsonl"
    one.write_text(out.read_text().splitlines()[0] + "\n")
    assert _run("lessons", "import", one, "--home", tmp_path / "third").stdout.startswith(
        "imported lesson 1 from"
    )
    assert _run("lessons", "delete", "1", "--home", home).exit_code == 0
    assert [r["id"] for r in json.loads(_run("lessons", "--home", home, "--json").stdout)] == [2]
    assert _run("lessons", "purge", "--home", home, "--yes").stdout.startswith("purged 2 lessons;")
    assert _run("teach", "--home", home, "--forget-exchanges", "--yes").stdout.startswith(
        "forgot 1 exchange;"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["ex-nope", "--answer", "x"], "ex-nope: no such exchange"),
        (["ex-nope"], "ex-nope: give --answer or --feedback"),
        (["ex-nope", "--answer", "x", "--feedback", "y"], "give only one of --answer, --feedback"),
        (
            [],
            r"give one of EXCHANGE \(with --answer or --feedback\), --rule or --fact \(mlx-sdft exchanges list",
        ),
        (["--list", "--import", "f.jsonl"], r"got --list, --import"),
        (["--answer", "x"], "name the exchange"),
        (["--list", "--redact", "("], r"--redact: '\(' is not a regular expression"),
        (["--list", "--redact", r"\d*"], r"--redact: '\\\\d\*' matches the empty string"),
        (["--list", "--redact", r"(?=x)"], r"--redact: '\(\?=x\)' matches the empty string"),
        (
            ["--list", "--feedback-template", "{question}"],
            r"--feedback-template: must contain \{answer\}",
        ),
    ],
)
def test_teach_bad_input_is_one_line(tmp_path, args, message):
    result = _run("teach", "--home", tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(message, result.stderr), (
        result.stderr
    )


def test_teach_of_an_exchange_in_a_home_not_made_yet_makes_none(tmp_path):
    home = tmp_path / "home"
    result = _run("teach", "--home", home, "ex-nope", "--answer", "x")
    assert result.exit_code == 2 and "ex-nope: no such exchange" in result.stderr, result.output
    listed = _run("teach", "--home", home, "--list")  # as every command that only reads
    assert listed.exit_code == 2 and f"--home {home}: no such folder" in listed.stderr
    assert not home.exists()


def test_a_home_that_is_a_file_is_named_as_one(tmp_path):
    home = tmp_path / "notes.txt"
    home.write_text("mine")
    result = _run("teach", "--home", home, "--rule", "Be brief.")
    assert result.exit_code == 2 and "notes.txt: a file, not a folder" in result.stderr, (
        result.output
    )
    assert home.read_text() == "mine"


def test_lessons_bad_id_and_export_of_nothing(tmp_path):
    Store(tmp_path).close()  # a home with no lessons
    for args, message in (
        (["show", "7"], "lesson 7: no such lesson"),
        (["--export", tmp_path / "x.jsonl"], "no lessons"),
    ):
        result = _run("lessons", *args, "--home", tmp_path)
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_lessons_export_refuses_an_existing_file_without_force(tmp_path):
    home = tmp_path / "home"
    with Store(home) as store:
        store.add_lesson(kind="import", prompt=MESSAGES, text="4")
    out = tmp_path / "mine.jsonl"
    out.write_text("mine\n")
    for args in (["lessons", "export", out], ["lessons", "--export", out]):
        refused = _run(*args, "--home", home)
        assert refused.exit_code == 2 and refused.stdout == "", refused.output
        assert refused.stderr.splitlines()[-1] == (
            f"mlx-sdft lessons{' export' if 'export' in args else ''}: error: {out}: already "
            "exists (--force replaces it)"
        ), refused.stderr
        assert out.read_text() == "mine\n"
    for args in (["lessons", "export", out, "--force"], ["lessons", "--export", out, "--force"]):
        replaced = _run(*args, "--home", home)
        assert replaced.exit_code == 0 and replaced.stdout.startswith("wrote 1 "), replaced.output
        assert [e.demonstration for e in load_examples(out)] == ["4"]


def test_lessons_export_says_how_many_rules_and_facts_it_left_out(tmp_path):
    home = tmp_path / "home"
    with Store(home) as store:
        store.add_lesson(kind="import", prompt=MESSAGES, text="4")
    alone = _run("lessons", "export", tmp_path / "a.jsonl", "--home", home)
    assert alone.exit_code == 0 and "left out" not in alone.stdout, alone.output
    with Store(home) as store:
        for kind, text in (("rule", "Be brief."), ("rule", "Sign as Sam."), ("fact", "Oslo.")):
            store.add_lesson(kind=kind, text=text)
    result = _run("lessons", "export", tmp_path / "b.jsonl", "--home", home)
    assert result.exit_code == 0 and result.stdout.startswith("wrote 1 lesson to"), result.output
    assert (
        "(2 rules and 1 fact left out: rules and facts are not training examples)" in result.stdout
    ), result.stdout
    with Store(home) as store:
        store.delete_lesson(1)
    nothing = _run("lessons", "export", tmp_path / "c.jsonl", "--home", home)
    assert nothing.exit_code == 2 and nothing.stderr.strip().endswith(
        "no lessons to export (2 rules and 1 fact left out: rules and facts are not training "
        "examples)"
    ), nothing.stderr
    assert not (tmp_path / "c.jsonl").exists()


def test_exported_feedback_lessons_train(tiny_model, tmp_path):
    """`lessons --export` output goes straight into `train`: the feedback lesson's own template reaches the
    teacher; --method sft refuses it (it has no demonstration)."""
    home = tmp_path / "home"
    with Store(home) as store:
        ex = store.exchange(_exchange(store))
        store.add_lessons(
            [
                lessons.from_exchange(ex, "feedback", "Count again.", FEEDBACK_TEMPLATE),
                lessons.from_exchange(ex, "demonstration", "4"),
            ]
        )
    data = tmp_path / "lessons.jsonl"
    assert _run("lessons", "--home", home, "--export", data).exit_code == 0
    common = [
        "--model",
        tiny_model,
        "--data",
        data,
        "--iters",
        1,
        "--batch-size",
        2,
        "--max-completion-length",
        4,
        "--num-layers",
        1,
        "--adapter-path",
        tmp_path / "a",
    ]
    result = _run("train", *common)
    assert result.exit_code == 0, result.output
    assert (
        "This is feedback on that response:" in result.stderr
    )  # the first lesson's teacher prompt
    result = _run("train", *common, "--method", "sft")
    assert (
        result.exit_code == 2
        and f"{data}:1: this example has a teacher context but no demonstration" in result.stderr
    )


def _shown(*command) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (command, result.output)
    return re.sub(r"\x1b\[[0-9;]*m", "", result.output)


@pytest.mark.parametrize("command", ["serve", "teach", "lessons"])
def test_options_page_and_help_list_every_personal_option(command):
    """Every option is in docs/options.md and in the --help of the command or of one of its
    subcommands; an old spelling (teach --list, lessons --export ...) is accepted but not shown, and
    the subcommand that replaces it is."""
    from conftest import ROOT
    from mlx_sdft.config import LessonsConfig, ServeConfig, TeachConfig, cli_fields

    options = {"serve": ServeConfig, "teach": TeachConfig, "lessons": LessonsConfig}[command]
    page = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    shown = _shown(command)
    subcommands = {"lessons": ["list", "show", "add", "import", "export", "delete", "purge"]}.get(
        command, []
    )
    elsewhere = " ".join(_shown(command, sub) for sub in subcommands)
    moved = {
        "teach": {
            "list": "exchanges list",
            "forget_exchanges": "exchanges forget",
            "import_file": "lessons import",
            "limit": "exchanges list",
            "yes": "exchanges forget",
        },
        "lessons": {"export": "lessons export"},
    }.get(command, {})
    for f in cli_fields(options):
        flag = f.metadata["flag"] or f"--{f.name.replace('_', '-')}"
        if f.metadata["argument"]:
            continue
        assert f"`{flag}`" in page, flag
        if f.name in moved:
            assert not re.search(rf"^[│|]?\s*{flag}\s", shown, re.M), flag
            assert "Usage" in _shown(*moved[f.name].split()), moved[f.name]
        else:
            assert flag in shown or flag in elsewhere, flag


def test_old_spellings_work_with_one_deprecation_line(tmp_path):
    """teach --list, teach --forget-exchanges, teach --import, lessons --export and rollback still work,
    each saying once on stderr what replaces it; the new spellings say nothing of the kind."""
    home = tmp_path / "home"
    with Store(home) as store:
        _exchange(store)
        store.add_lesson(kind="import", prompt=MESSAGES, text="4")
    out = tmp_path / "lessons.jsonl"
    for old, new in (
        (["teach", "--list"], ["exchanges", "list"]),
        (["lessons", "--export", out], ["lessons", "export", out, "--force"]),
        (["teach", "--import", out], ["lessons", "import", out]),
        (["teach", "--forget-exchanges", "--yes"], ["exchanges", "forget", "--yes"]),
    ):
        before = _run(*old, "--home", home)
        assert before.exit_code == 0, before.output
        assert (
            before.stderr.count("deprecated") == 1
            and f"use `mlx-sdft {' '.join(new[:2])}" in before.stderr
        ), before.stderr
        if "--forget-exchanges" in old:
            with Store(home) as store:
                _exchange(store)
        after = _run(*new, "--home", home)
        assert after.exit_code == 0 and "deprecated" not in after.stderr, after.output
        assert after.stdout.split()[:2] == before.stdout.split()[:2], (before.stdout, after.stdout)
    result = _run("rollback", "--home", home)
    assert (
        result.exit_code == 2 and "use `mlx-sdft versions rollback`" in result.stderr
    )  # version 0: nothing to roll back
    import typer.main

    assert typer.main.get_command(app).commands["rollback"].hidden  # listed under versions only


def _answered(answer, *args, capsys, monkeypatch):
    """`echo ANSWER | mlx-sdft ARGS` through the console script: (status, stdout, stderr)."""
    import io

    from mlx_sdft.cli import main

    monkeypatch.setattr("sys.argv", ["mlx-sdft", *map(str, args)])
    monkeypatch.setattr("sys.stdin", io.StringIO(answer + "\n"))
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, *capsys.readouterr()


@pytest.mark.parametrize(
    "args, kept",
    [
        (["lessons", "purge"], "lessons kept: nothing deleted"),
        (["exchanges", "forget"], "exchanges kept: nothing deleted"),
        (["teach", "--forget-exchanges"], "exchanges kept: nothing deleted"),
        (["rules", "remove", "RULE"], "rule RULE kept: nothing removed"),
    ],
)
def test_a_no_to_a_deletion_keeps_everything_and_says_so(tmp_path, capsys, monkeypatch, args, kept):
    """A "no": the prompt's line ended (a piped answer is not echoed), one line saying what is
    kept, and click's Abort status 1, not Ctrl-C's 130."""
    from mlx_sdft.store.rules import add_standing

    with Store(tmp_path) as store:
        _exchange(store)
        store.add_lesson(kind="import", prompt=MESSAGES, text="4")
        rule, _ = add_standing(store, "rule", "Answer in French.")
    args = [a.replace("RULE", str(rule)) for a in args]
    status, out, err = _answered(
        "n", *args, "--home", tmp_path, capsys=capsys, monkeypatch=monkeypatch
    )
    assert status == 1, (out, err)
    assert out.endswith("? [y/N]: \n") and out.count("\n") == 1, out
    *before, last = err.splitlines(keepends=True)  # before: teach --forget-exchanges' deprecation
    assert last == kept.replace("RULE", str(rule)) + "\n" and all(
        "deprecated" in line for line in before
    ), err
    with Store(tmp_path) as store:
        assert len(store.lessons()) == 2 and len(store.exchanges()) == 1


def test_a_yes_to_a_deletion_deletes(tmp_path, capsys, monkeypatch):
    with Store(tmp_path) as store:
        store.add_lesson(kind="import", prompt=MESSAGES, text="4")
    status, out, err = _answered(
        "y", "lessons", "purge", "--home", tmp_path, capsys=capsys, monkeypatch=monkeypatch
    )
    assert status == 0 and "? [y/N]: \npurged 1 lesson;" in out and not err, (out, err)
    with Store(tmp_path) as store:
        assert store.lessons() == []


def test_a_bad_import_file_leaves_no_home_behind(tmp_path):
    from typer.testing import CliRunner

    from mlx_sdft.cli import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    result = CliRunner().invoke(
        app, ["lessons", "import", str(bad), "--home", str(tmp_path / "home")]
    )
    assert result.exit_code == 2 and f"{bad}:1:" in result.output, result.output
    assert not (tmp_path / "home").exists()


def test_teach_with_nothing_names_only_the_current_ways(tmp_path):
    said = _run("teach", "--home", tmp_path).stderr
    assert "--list" not in said and "--import" not in said and "--forget-exchanges" not in said, (
        said
    )


def test_a_deletion_with_no_terminal_to_ask_on_says_to_pass_yes(tmp_path):
    result = _run(
        "exchanges", "forget", "--home", tmp_path
    )  # CliRunner's stdin: empty, not a terminal
    assert result.exit_code == 2 and "pass --yes" in result.stderr, result.output
    no = _run(
        "exchanges", "forget", "--home", tmp_path, input="n\n"
    )  # answered: an abort, as before
    assert no.exit_code not in (0, 2) and "pass --yes" not in no.output


def test_a_flag_without_its_value_names_the_command(capsys, monkeypatch):
    from mlx_sdft.cli import main

    monkeypatch.setattr("sys.argv", ["mlx-sdft", "export", "--out"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and capsys.readouterr().err.startswith(
        "mlx-sdft export: error: Option '--out'"
    )
