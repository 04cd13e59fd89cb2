"""The CLI end to end: the smoke recipe trains, bad input stops with one line and exit status 2."""

import json
import re

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from conftest import ROOT

runner = CliRunner()
SMOKE = str(ROOT / "recipes" / "smoke" / "config.yaml")
# The flags train shares with mlx_lm.lora (same names) and SDFT's own.
MLX_LM_AND_SDFT_FLAGS = (
    "--model --data --adapter-path --fine-tune-type --num-layers --batch-size --grad-accumulation-steps --iters "
    "--learning-rate --optimizer --seed --save-every --steps-per-report --steps-per-eval --val-batches "
    "--max-seq-length --grad-checkpoint --resume-adapter-file --report-to --project-name --config "
    "--method --teacher --teacher-update-rate --divergence --num-generations --max-completion-length "
    "--temperature --top-p --skip-first-tokens --teacher-template --epochs"
).split()


def _train(*args):
    return runner.invoke(app, ["train", *map(str, args)])


def _one_line_error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, lines[0]), lines[0]


def test_help_lists_every_flag():
    out = re.sub(
        r"\x1b\[[0-9;]*m",
        "",
        runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output,
    )
    for flag in MLX_LM_AND_SDFT_FLAGS:
        assert flag in out, flag


def test_smoke_recipe_trains_through_the_cli(tiny_model, tmp_path):
    out = tmp_path / "adapters"
    result = _train("-c", SMOKE, "--model", tiny_model, "--num-layers", -1, "--adapter-path", out)
    assert result.exit_code == 0, result.output
    assert "student prompt" in result.stderr and "teacher prompt" in result.stderr
    assert "This is an example for a response to the question:" in result.stderr
    assert f"--adapter-path {out}" in result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["iters"] == 3 and config["max_completion_length"] == 24  # from the YAML
    assert config["num_layers"] == -1  # the flag beats the YAML and the default
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # three reports and the final eval


def test_bad_data_line_stops_before_anything_is_written(tiny_model, tmp_path):
    data = tmp_path / "demos.jsonl"
    good = json.dumps({"prompt": "Hi?", "completion": "Hello."})
    data.write_text(
        good + "\n" + good + "\n" + json.dumps({"prompt": "Hi?", "completion": "  "}) + "\n"
    )
    out = tmp_path / "adapters"
    result = _train("--model", tiny_model, "--data", data, "--adapter-path", out)
    _one_line_error(result, rf"{re.escape(str(data))}:3: .*completion")
    assert not out.exists()


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--top-p", "2"], r"--top-p: must be in \(0, 1\]"),
        (["--temperature", "0"], r"--temperature: must be > 0"),
        (["--divergence", "tv"], r"--divergence: 'tv' is not one of forward, reverse, jsd"),
        (["--teacher", "frozen"], r"--teacher: 'frozen' is not one of ema, base, live"),
        (["--learning-rate", "-1"], r"--learning-rate: must be > 0"),
        (["--skip-first-tokens", "-1"], r"--skip-first-tokens: must be >= 0"),
        (["--teacher-template", "no slots"], r"--teacher-template: must contain \{question\}"),
        (["--model", "/no/such/model"], r"/no/such/model: no such model folder"),
    ],
)
def test_bad_options_exit_2(tiny_model, smoke_data, tmp_path, args, pattern):
    out = tmp_path / "adapters"
    result = _train("--model", tiny_model, "--data", smoke_data, "--adapter-path", out, *args)
    _one_line_error(result, pattern)
    assert not out.exists()


def test_bad_yaml(tmp_path, tiny_model):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("iters: 2\nlearning_rat: 1e-4\n")
    _one_line_error(
        _train("-c", unknown, "--model", tiny_model), r"unknown.yaml: unknown option 'learning_rat'"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("iters: [2\n")
    _one_line_error(_train("-c", broken), r"broken.yaml:\d+: invalid YAML")
    typed = tmp_path / "typed.yaml"
    typed.write_text("iters: many\n")
    _one_line_error(
        _train("-c", typed), r"typed.yaml:1: iters: expected int, got 'many'"
    )  # the file, not a flag


def _help(*command: str) -> str:
    return re.sub(
        r"\x1b\[[0-9;]*m",
        "",
        runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output,
    )


def test_help_shows_panels_hides_engine_knobs_and_marks_required():
    shown = _help("train")
    for panel in (
        "Essentials",
        "Model and templates",
        "Optimizer",
        "SDFT",
        "Guards",
        "Memory and speed",
        "Reporting",
    ):
        assert f"─ {panel} ─" in shown, panel
    assert shown.index("─ Essentials ─") < shown.index("─ SDFT ─") < shown.index("─ Reporting ─")
    for knob in (
        "--compiled-decode",
        "--fuse-sampling",
        "--logits-chunk",
    ):  # the first one retired, still hidden
        assert knob not in shown, knob
    assert "[default: None]" not in shown
    assert re.search(r"--data .*\[required\]", shown.replace("\n", " "))
    assert "[required]" in _help("export") and "[required]" in _help("generate")


def test_hidden_engine_knobs_are_accepted(tiny_model, smoke_data, tmp_path):
    result = _train(
        "--model",
        tiny_model,
        "--data",
        smoke_data,
        "--adapter-path",
        tmp_path / "a",
        "--dry-run",
        "--no-fuse-sampling",
        "--logits-chunk",
        8,
    )
    assert result.exit_code == 0, result.output


def test_doctor_reports_the_backend_and_blas():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for key in ("backend", "default_device", "memory_gb", "blas", "distributed", "mlx_lm"):
        assert f"{key}:" in result.stdout


def _help(*command: str) -> str:
    from typer.testing import CliRunner

    from mlx_sdft.cli import app

    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    "command",
    [
        (),
        ("train",),
        ("continual",),
        ("rules",),
        ("rules", "add"),
        ("teach",),
        ("doctor",),
        ("lessons", "import"),
    ],
)
def test_help_is_a_plain_flag(command):
    line = next(line for line in _help(*command).splitlines() if "--help" in line)
    assert "<bool>" not in line, line


def test_help_marks_required_one_way_and_each_subcommand_shows_its_own_text():
    add = _help("rules", "add")
    assert "rules add [OPTIONS] TEXT" in add and "[TEXT]" not in add and "[required]" in add
    continual = _help("continual")
    assert "[required]" in continual and "*" not in continual
    for sub in ("check", "remove", "add"):
        said = _help("rules", sub)
        assert "add:" not in said and "remove:" not in said and "check:" not in said, said
    assert "every rule" in _help("rules", "check") and "every rule" not in _help("rules", "remove")
    assert "Delete without asking" not in _help("teach") and "--yes" in _help("exchanges", "forget")


def test_version_prints_the_versions_a_run_records():
    from mlx_sdft import package_versions

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.split() == [w for kv in package_versions().items() for w in kv]
