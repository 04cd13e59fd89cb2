"""The hostile-input corpus (tests/data/bad/) through the CLI: every input either works or exits
with status 2 and one line naming the file, the line and the field; the output folder stays
untouched and no traceback is shown."""

import json
import re

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from mlx_sdft.cli import app

BAD = ROOT / "tests" / "data" / "bad"
runner = CliRunner()

# name: (extra CLI arguments, what the one error line must match; None = must work)
DATA = {
    "bad_json.jsonl": r"bad_json.jsonl:2: invalid JSON",
    "not_an_object.jsonl": r"not_an_object.jsonl:2: .*object",
    "prompt_wrong_type.jsonl": r"prompt_wrong_type.jsonl:2: \"prompt\"",
    "completion_wrong_type.jsonl": r"completion_wrong_type.jsonl:2: \"completion\" must be a non-empty string",
    "empty_demonstration.jsonl": r"empty_demonstration.jsonl:2: \"completion\" must be a non-empty string",
    "whitespace_demonstration.jsonl": r"whitespace_demonstration.jsonl:2: \"completion\" must be a non-empty string",
    "missing_completion.jsonl": r"missing_completion.jsonl:2: .*completion",
    "missing_prompt.jsonl": r"missing_prompt.jsonl:2: ",
    "last_turn_not_assistant.jsonl": r"last_turn_not_assistant.jsonl:2: .*assistant",
    "prompt_not_ending_with_user.jsonl": r"prompt_not_ending_with_user.jsonl:2: .*user",
    "unknown_role.jsonl": r"unknown_role.jsonl:1: messages\[0\]\.role \"robot\" is not one of",
    "content_wrong_type.jsonl": r"content_wrong_type.jsonl:1: messages\[0\]\.content",
    "empty_prompt_list.jsonl": r"empty_prompt_list.jsonl:1: \"prompt\"",
    "tools_not_a_list.jsonl": r"tools_not_a_list.jsonl:1: \"tools\"",
    "privileged_context_empty.jsonl": r"privileged_context_empty.jsonl:1: \"privileged_context\"",
    "mixed_formats.jsonl": r"mixed_formats.jsonl:2: mixed formats",
    "non_utf8.jsonl": r"non_utf8.jsonl:2: .*UTF-8",
    "empty_file.jsonl": r"empty_file.jsonl: no examples",
    "blank_lines_only.jsonl": r"blank_lines_only.jsonl: no examples",
    "too_long_prompt.jsonl": r"too_long_prompt.jsonl:2: the prompt is \d+ tokens.*--max-seq-length 256",
    "folder_without_train": r"folder_without_train.*train.jsonl",
    "directory.jsonl": r"directory.jsonl.*(folder|directory)",
    "does_not_exist.jsonl": r"does_not_exist.jsonl.*no such file",
    "ok_bom.jsonl": None,
    "ok_crlf.jsonl": None,
}
CONFIGS = {
    "bad_yaml.yaml": r"bad_yaml.yaml:\d+: invalid YAML",
    "unknown_key.yaml": r"unknown_key.yaml: unknown option 'learning_rat'",
    "wrong_type.yaml": r"wrong_type.yaml:1: iters: expected int, got 'two'",  # the file and line, not a flag
    "not_a_mapping.yaml": r"not_a_mapping.yaml: a config file must be a mapping",
}
FLAGS = {
    "negative_lr": (["--learning-rate", "-1e-4"], r"--learning-rate: must be > 0"),
    "zero_temperature": (["--temperature", "0"], r"--temperature: must be > 0"),
    "negative_skip": (["--skip-first-tokens", "-1"], r"--skip-first-tokens: must be >= 0"),
    "top_p_above_one": (["--top-p", "1.5"], r"--top-p: must be in \(0, 1\]"),
    "top_p_zero": (["--top-p", "0"], r"--top-p: must be in \(0, 1\]"),
    "unknown_divergence": (["--divergence", "kl"], r"--divergence: 'kl' is not one of"),
    "unknown_teacher": (["--teacher", "oracle"], r"--teacher: 'oracle' is not one of"),
    "unknown_method": (["--method", "rl"], r"--method: 'rl' is not one of"),
    "chat_template_no_file": (
        ["--chat-template", "chatml.jinja"],
        r"--chat-template: chatml.jinja: no such file",
    ),
    "teacher_template_no_file": (
        ["--teacher-template", "prompts/teacher"],
        r"--teacher-template: prompts/teacher: no such file",
    ),
    "completion_within_skip": (
        ["--max-completion-length", "3", "--skip-first-tokens", "3"],
        r"--max-completion-length: 3 <= --skip-first-tokens 3: every sampled token",
    ),
}


def _run(args, out):
    result = runner.invoke(
        app,
        [
            "train",
            *map(str, args),
            "--adapter-path",
            str(out),
            "--dry-run",
            "--max-seq-length",
            "256",
        ],
    )
    return result


def _check(result, pattern, out):
    text = result.stderr if pattern else result.output
    assert "Traceback" not in result.output, result.output
    if pattern is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and re.search(pattern, lines[0]), text
    assert not out.exists()  # --dry-run or an error: nothing written either way


@pytest.mark.parametrize("name", sorted(DATA))
def test_bad_data(name, tiny_model, tmp_path):
    out = tmp_path / "adapters"
    _check(_run(["--model", tiny_model, "--data", BAD / name], out), DATA[name], out)


def test_ten_megabyte_line_is_fine(tiny_model, tmp_path):
    data = tmp_path / "big.jsonl"
    row = {
        "prompt": "What is the capital of Peru?",
        "completion": "The capital of Peru is Lima.",
        "notes": "x" * 10_000_000,
    }
    data.write_text(json.dumps(row) + "\n")
    out = tmp_path / "adapters"
    _check(_run(["--model", tiny_model, "--data", data], out), None, out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_config(name, tiny_model, smoke_data, tmp_path):
    out = tmp_path / "adapters"
    _check(
        _run(["-c", BAD / name, "--model", tiny_model, "--data", smoke_data], out),
        CONFIGS[name],
        out,
    )


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_bad_flags(name, tiny_model, smoke_data, tmp_path):
    args, pattern = FLAGS[name]
    out = tmp_path / "adapters"
    _check(_run(["--model", tiny_model, "--data", smoke_data, *args], out), pattern, out)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (
            ["--batch-size", "four"],
            r"mlx-sdft train: error: Invalid value for '--batch-size': .*integer",
        ),
        (["--no-such-flag"], r"mlx-sdft train: error: No such option: --no-such-flag"),
    ],
)
def test_unparseable_flags_are_one_line_too(args, pattern, tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "mlx_sdft", "train", *args], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        re.fullmatch(pattern + r".*", result.stderr.strip())
        and len(result.stderr.strip().splitlines()) == 1
    )


def test_corpus_size():
    assert len(DATA) + len(CONFIGS) + len(FLAGS) + 1 >= 25
