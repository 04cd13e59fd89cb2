"""The CLI end to end: the smoke recipe trains, bad input stops with one line and exit status 2."""

import json
import re

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from conftest import ROOT

runner = CliRunner()
SMOKE = str(ROOT / "recipes" / "smoke" / "config.yaml")
DESIGN_FLAGS = (
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
    out = re.sub(r"\x1b\[[0-9;]*m", "", runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output)
    for flag in DESIGN_FLAGS:
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
    data.write_text(good + "\n" + good + "\n" + json.dumps({"prompt": "Hi?", "completion": "  "}) + "\n")
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
    _one_line_error(_train("-c", unknown, "--model", tiny_model), r"unknown.yaml: unknown option 'learning_rat'")
    broken = tmp_path / "broken.yaml"
    broken.write_text("iters: [2\n")
    _one_line_error(_train("-c", broken), r"broken.yaml:\d+: invalid YAML")
    typed = tmp_path / "typed.yaml"
    typed.write_text("iters: many\n")
    _one_line_error(_train("-c", typed), r"typed.yaml:1: iters: expected int, got 'many'")  # the file, not a flag


def test_readme_documents_every_option():
    from mlx_sdft.config import cli_fields

    readme = (ROOT / "README.md").read_text()
    for f in cli_fields():
        assert f"`--{f.name.replace('_', '-')}`" in readme, f.name


def test_readme_gives_every_default():
    """The train options table's default column is Config's: a value in backticks is the default as
    written, `off`/`on` a flag or an option that is off (None); prose (a template, a vocabulary) is not
    checked."""
    import dataclasses

    from mlx_sdft.config import Config, cli_fields

    readme = (ROOT / "README.md").read_text()
    cells = dict(reversed(re.findall(r"^\| `--([a-z-]+)` \| ([^|]*?) \|", readme, re.M)))  # a flag's first row
    checked = 0
    for f in cli_fields(Config):
        cell, default = cells.get(f.name.replace("_", "-"), ""), f.default
        if default is dataclasses.MISSING or not cell:
            continue
        if literal := re.match(r"`([^`]*)`", cell):
            assert literal.group(1) == str(default), (f.name, cell, default)
        elif cell in ("off", "on"):
            assert default in ((False, None) if cell == "off" else (True,)), (f.name, cell, default)
        else:
            continue
        checked += 1
    assert checked >= 40  # the table is found and read
    for name in ("skip_first_tokens", "completion_budget", "truncated", "sft_weight"):  # issue 14's defaults
        assert re.match(r"`[^`]+`", cells[name.replace("_", "-")]), name


def test_doctor_reports_the_backend_and_blas():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for key in ("backend", "default_device", "memory_gb", "blas", "distributed", "mlx_lm"):
        assert f"{key}:" in result.stdout


def test_readme_library_example_runs(tiny_model, tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert '{"model": "path/to/model"}' in code
    code = code.replace('{"model": "path/to/model"}',
                        f'{{"model": {str(tiny_model)!r}, "adapter_path": {str(tmp_path / "a")!r}, "iters": 1, "num_layers": -1}}')
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "a" / "adapters.safetensors").exists()
