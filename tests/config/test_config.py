"""Options declared once: shared groups, one rule for paths in YAML files, every command's flags generated."""

import re

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.config import (
    CheckConfig,
    Config,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    cli_fields,
    load_config,
)
from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import read_yaml

COMMANDS = {
    "train": Config,
    "eval": EvalConfig,
    "check": CheckConfig,
    "generate": GenerateConfig,
    "export": ExportConfig,
}
runner = CliRunner()


@pytest.mark.parametrize(
    "name",
    [
        "model",
        "dequantize",
        "data",
        "max_seq_length",
        "chat_template",
        "teacher_template",
        "max_tokens",
    ],
)
def test_shared_options_are_declared_once(name):
    """Model source, data, sequence length, templates and answer length: one declaration (default
    and help) that every command having the option inherits."""
    declared = {
        id(cls.__dataclass_fields__[name])
        for cls in COMMANDS.values()
        if name in cls.__dataclass_fields__
    }
    assert len(declared) == 1


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_flag_per_option_and_a_config_file(command):
    """Every option has a flag in --help, but for the hidden engine knobs (docs/options.md lists those)."""
    out = re.sub(
        r"\x1b\[[0-9;]*m",
        "",
        runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output,
    )
    for f in cli_fields(COMMANDS[command]):
        assert (f"--{f.name.replace('_', '-')}" in out) != f.metadata["hidden"], f.name
    assert "--config" in out


@pytest.mark.parametrize(
    "command,args,message",
    [
        (
            "generate",
            ["--model", "m", "--prompt", "Hi", "--max-tokens", "0"],
            "--max-tokens: must be > 0, got 0",
        ),
        ("generate", ["--model", "m"], "--prompt: required"),
        ("export", ["--model", "m.gguf"], "--out: required"),
    ],
)
def test_generate_and_export_check_their_options_like_the_rest(command, args, message):
    result = runner.invoke(app, [command, *args])
    assert (
        result.exit_code == 2 and result.stderr.strip() == f"mlx-sdft {command}: error: {message}"
    ), result.output


def test_paths_in_a_yaml_file_are_relative_to_it(tmp_path):
    """One rule for every options file: a relative path option that exists next to the file is
    taken from there; anything else (a hub id, a non-path option) is left as written."""
    recipe = tmp_path / "recipe"
    (recipe / "data").mkdir(parents=True)
    (recipe / "teacher.txt").write_text("{question} / {demonstration}")
    (recipe / "normalized").write_text("not a path option")
    (recipe / "eval.yaml").write_text(
        "model: org/name\ndata: data\nmetric: normalized\nprior_text: absent.jsonl\n"
    )
    values = read_yaml(recipe / "eval.yaml", EvalConfig)
    assert values == {
        "model": "org/name",
        "data": str(recipe / "data"),
        "metric": "normalized",
        "prior_text": "absent.jsonl",
    }
    (recipe / "train.yaml").write_text(
        "model: org/name\ndata: data\nteacher_template: teacher.txt\n"
    )
    cfg = load_config(str(recipe / "train.yaml"))
    assert (
        cfg.data == str(recipe / "data") and cfg.teacher_template == "{question} / {demonstration}"
    )


def test_continual_stages_use_the_same_rule(tmp_path):
    from mlx_sdft.jobs.continual import read_stages

    (tmp_path / "a").mkdir()
    (tmp_path / "teacher.txt").write_text("{question} {demonstration}")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi"}\n')
    (tmp_path / "stages.yaml").write_text(
        "model: org/name\nteacher_template: teacher.txt\neval: {general_prompts: prompts.jsonl}\n"
        "stages:\n  - {name: a, data: a}\n  - {name: b, data: /abs/b}\n"
    )
    run = read_stages(str(tmp_path / "stages.yaml"))
    assert run["defaults"]["teacher_template"] == str(tmp_path / "teacher.txt")
    assert run["eval"]["general_prompts"] == str(tmp_path / "prompts.jsonl")
    assert [s["data"] for s in run["stages"]] == [str(tmp_path / "a"), "/abs/b"]


def test_check_needs_the_teacher_template_slots_like_train(tmp_path):
    """A shared group brings its checks along: check now rejects a teacher template without slots, as train does."""
    from mlx_sdft.errors import InputError

    with pytest.raises(InputError, match=r"--teacher-template: must contain \{question\}"):
        CheckConfig(model="m", data="d", teacher_template="no slots").validate()
    assert CheckConfig(model="m", data="d").validate().max_tokens == 256


def test_generate_reads_its_options_from_a_yaml_file_too(tiny_model, tmp_path):
    (tmp_path / "generate.yaml").write_text(f"model: {tiny_model}\nprompt: Hi\nmax_tokens: 3\n")
    result = runner.invoke(
        app, ["generate", "-c", str(tmp_path / "generate.yaml"), "--max-tokens", "2"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # greedy tokens of the tiny random model


def test_lora_parameters_in_yaml_keep_the_defaults_they_do_not_name(tmp_path):
    """`lora_parameters: {rank: 16}` (what a mlx_lm.lora user writes) keeps mlx-lm's scale and
    dropout; an unknown key (a typo, or PEFT's `alpha`) is one line naming it, not a silent rank-8 run."""
    from mlx_sdft.config import load_config
    from mlx_sdft.errors import InputError

    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: demos.jsonl\nlora_parameters: {rank: 16}\n")
    assert load_config(str(path)).lora_parameters == {"rank": 16, "scale": 20.0, "dropout": 0.0}
    path.write_text("model: m\ndata: demos.jsonl\nlora_parameters: {rank: 4, alpha: 8}\n")
    with pytest.raises(
        InputError, match=r"lora_parameters: takes rank, scale, dropout and keys .*'alpha'"
    ):
        load_config(str(path))
    assert load_config(None, {"model": "m", "data": "demos.jsonl"}).lora_parameters == {
        "rank": 8,
        "scale": 20.0,
        "dropout": 0.0,
    }


def test_epochs_given_over_a_yaml_iters_wins(tmp_path):
    """--iters overrides --epochs; a flag beats the YAML file: `-c smoke.yaml --epochs 1` (the
    file has `iters: 3`) runs one epoch, not 3 steps with the flag silently ignored."""
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: demos.jsonl\niters: 3\n")
    assert load_config(str(path)).iters == 3
    cfg = load_config(str(path), {"epochs": 1.0})
    assert cfg.iters is None and cfg.epochs == 1.0
    assert (
        load_config(str(path), {"epochs": 1.0, "iters": 5}).iters == 5
    )  # both flags: --iters, as documented


def test_a_stage_epochs_under_a_stages_file_iters_wins(tmp_path):
    from mlx_sdft.jobs.continual import stage_config

    run = {"defaults": {"iters": 16}, "model": "m"}
    cfg = stage_config(run, {"name": "a", "data": "d.jsonl", "epochs": 1}, "sdft", tmp_path, None)
    assert cfg.iters is None and cfg.epochs == 1.0
    assert stage_config(run, {"name": "a", "data": "d.jsonl"}, "sdft", tmp_path, None).iters == 16


def test_sdft_defaults_since_issue_14_and_how_to_turn_them_off(tmp_path):
    """The defaults: no skipped prefix, a budget of 2x the demonstration, truncated completions
    masked, the SFT term at 0.5. `--completion-budget 0` (flag, YAML, or null in YAML) turns the
    budget off, stored as None as before; PAPER_SDFT gives the paper's objective back."""
    from mlx_sdft.config import PAPER_SDFT
    from mlx_sdft.errors import InputError

    base = {"model": "m", "data": "demos.jsonl"}
    cfg = load_config(None, base)
    assert (cfg.skip_first_tokens, cfg.completion_budget, cfg.truncated, cfg.sft_weight) == (
        0,
        2.0,
        "mask",
        0.5,
    )
    assert (
        CheckConfig(model="m", data="demos.jsonl").validate().skip_first_tokens == 0
    )  # check warns for the same skip
    assert load_config(None, {**base, "completion_budget": 0}).completion_budget is None
    paper = load_config(None, {**base, **PAPER_SDFT})
    assert (
        paper.skip_first_tokens,
        paper.completion_budget,
        paper.truncated,
        paper.sft_weight,
    ) == (3, None, "keep", 0.0)
    path = tmp_path / "c.yaml"
    for off in ("0", "null"):
        path.write_text(f"model: m\ndata: demos.jsonl\ncompletion_budget: {off}\n")
        assert load_config(str(path)).completion_budget is None
    for name, value, message in (
        ("completion_budget", -1.0, r"--completion-budget: must be >= 0 \(0: off\), got -1.0"),
        ("completion_budget", float("inf"), r"--completion-budget: must be >= 0"),
        ("sft_weight", -0.5, r"--sft-weight: must be >= 0, got -0.5"),
        ("sft_weight", float("nan"), r"--sft-weight: must be >= 0, got nan"),
    ):
        with pytest.raises(InputError, match=message):
            load_config(None, {**base, name: value})
    # SFT is validated with the SDFT defaults in place (they do not apply to it, and are not refused).
    assert load_config(None, {**base, "method": "sft", "max_completion_length": 1}).method == "sft"
    assert (
        "0: off" in Config.__dataclass_fields__["completion_budget"].metadata["help"]
    )  # what --help says


@pytest.mark.parametrize(
    "cls,command,key,kind",
    [
        (Config, "train", "sft_weight", "float"),
        (Config, "train", "skip_first_tokens", "int"),
        (Config, "train", "truncated", "str"),
        (Config, "train", "temperature", "float"),
        (Config, "train", "base_kl_weight", "float"),
        (EvalConfig, "eval", "general_max_tokens", "int"),
        (CheckConfig, "check", "skip_first_tokens", "int"),
    ],
)
def test_a_yaml_null_is_refused_for_an_option_that_cannot_be_off(tmp_path, cls, command, key, kind):
    """`null` in a YAML file means "off" only for an option whose value may be None (`completion_budget`,
    `iters`, `topk`, ...). Anywhere else it was a traceback (`sft_weight: null`: TypeError, exit 1) or
    slipped through unchecked (`truncated: null` became None): one line naming the file, line and
    key, exit 2, before any model loads."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\ndata: demos.jsonl\n{key}: null\n")
    with pytest.raises(InputError, match=rf"c\.yaml:3: {key}: expected {kind}, got null"):
        load_config(str(path), cls=cls)
    result = runner.invoke(app, [command, "-c", str(path)])
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"mlx-sdft {command}: error: {path}:3: {key}: expected {kind}, got null"
    ), result.output
    path.write_text("model: m\ndata: demos.jsonl\ncompletion_budget: null\ntopk: ~\niters: null\n")
    cfg = load_config(str(path))
    assert (cfg.completion_budget, cfg.topk, cfg.iters) == (None, None, None)  # these can be off


def test_a_stages_file_null_turns_an_option_off_as_in_any_yaml_file(tmp_path):
    """`completion_budget: null` in a stages file turned the budget off nowhere: the stage ran with
    the default 2.0 (a null was taken for "not given"). Now it is off, as in a `-c` file, whether the
    stage or the file's top level says it; a null for an option that cannot be off is refused."""
    from mlx_sdft.jobs.continual import stage_config

    run = {"defaults": {"completion_budget": None}, "model": "m"}
    assert (
        stage_config(
            run, {"name": "a", "data": "d.jsonl"}, "sdft", tmp_path, None
        ).completion_budget
        is None
    )
    run = {"defaults": {}, "model": "m"}
    stage = {"name": "a", "data": "d.jsonl", "completion_budget": None, "max_degenerate_rise": None}
    assert stage_config(run, stage, "sdft", tmp_path, None).completion_budget is None
    assert (
        stage_config(
            run, {"name": "a", "data": "d.jsonl"}, "sdft", tmp_path, None
        ).completion_budget
        == 2.0
    )
    with pytest.raises(InputError, match=r"--sft-weight: expected float, got null"):
        stage_config(
            run, {"name": "a", "data": "d.jsonl", "sft_weight": None}, "sdft", tmp_path, None
        )


def test_learn_composes_train_options_and_writes_each_default_once(tmp_path):
    """learn declares none of train's options but its model: its own defaults are one mapping over
    train's (help, group and choices kept), the options it sets itself are no flags, and every other
    train option keeps train's default; a YAML file or a flag still sets any of them."""
    import dataclasses

    from mlx_sdft.config import LearnConfig
    from mlx_sdft.config.personal import LEARN_DEFAULTS, LEARN_SETS

    train = {f.name: f for f in dataclasses.fields(Config)}
    assert set(vars(LearnConfig)["__annotations__"]) & set(train) == {"model"}
    learn = {f.name: f for f in dataclasses.fields(LearnConfig)}
    for name, f in train.items():
        if name == "model":
            continue
        default = (
            learn[name].default
            if learn[name].default is not dataclasses.MISSING
            else learn[name].default_factory()
        )
        ours = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default == LEARN_DEFAULTS.get(name, ours), name
        assert learn[name].metadata["cli"] is (f.metadata["cli"] and name not in LEARN_SETS), name
        if name in LEARN_DEFAULTS:
            assert {k: v for k, v in learn[name].metadata.items()} == dict(f.metadata), name
    cfg = load_config(None, {"learning_rate": 2e-4, "home": str(tmp_path)}, LearnConfig)
    assert (
        cfg.learning_rate == 2e-4
        and cfg.iters == LEARN_DEFAULTS["iters"]
        and cfg.epochs == Config.epochs
    )


RETIRED_LINE = (
    "deprecated and ignored: the compiled decode step is retired; sampling runs the plain decode loop "
    "(the option goes in the next release)"
)


@pytest.mark.parametrize("flag", ["--compiled-decode", "--no-compiled-decode"])
@pytest.mark.parametrize("command", ["train", "learn"])
def test_a_retired_flag_is_accepted_ignored_and_named(tmp_path, command, flag):
    """As mlx_lm.lora users expect of an option that goes: for one release the flag still parses,
    changes nothing (the command ends as it does without it), and says so in one line."""
    without = runner.invoke(app, [command, "--iters", "0"])
    result = runner.invoke(app, [command, flag, "--iters", "0"])
    assert result.exit_code == without.exit_code == 2 and "compiled" not in without.stderr, (
        without.output
    )
    assert (
        result.stderr == f"mlx-sdft: {command} --compiled-decode: {RETIRED_LINE}\n" + without.stderr
    )


def test_a_retired_key_in_a_yaml_file_is_ignored_with_its_line(tmp_path, capsys):
    """In a -c file (and a --learn-config, read the same way): named by file and line, then ignored;
    a key that never was an option is still refused."""
    from mlx_sdft.config import LearnConfig

    path = tmp_path / "train.yaml"
    path.write_text("model: org/name\ndata: d.jsonl\ncompiled_decode: true\niters: 3\n")
    cfg = load_config(str(path))
    assert (
        cfg.iters == 3
        and not hasattr(cfg, "compiled_decode")
        and "compiled_decode" not in cfg.to_dict()
    )
    assert capsys.readouterr().err == f"mlx-sdft: {path}:3: compiled_decode: {RETIRED_LINE}\n"
    assert read_yaml(path, LearnConfig) == {"model": "org/name", "data": "d.jsonl", "iters": 3}
    path.write_text("model: org/name\ncompiled_decoding: true\n")
    with pytest.raises(InputError, match=r"unknown option 'compiled_decoding'"):
        load_config(str(path))


def test_a_retired_key_in_a_stages_file_is_ignored(tmp_path, capsys):
    from mlx_sdft.jobs.continual import read_stages

    (tmp_path / "stages.yaml").write_text(
        "model: org/name\ncompiled_decode: false\nstages:\n  - {name: a, data: a, compiled_decode: true}\n"
    )
    run = read_stages(str(tmp_path / "stages.yaml"))
    assert "compiled_decode" not in run["defaults"] and "compiled_decode" not in run["stages"][0]
    assert capsys.readouterr().err.splitlines() == [
        f"mlx-sdft: {tmp_path / 'stages.yaml'}:2: compiled_decode: {RETIRED_LINE}",
        f"mlx-sdft: {tmp_path / 'stages.yaml'}: stages[1] (a): compiled_decode: {RETIRED_LINE}",
    ]


@pytest.mark.parametrize("saved", [True, False])
def test_a_saved_run_with_a_retired_option_resumes(tmp_path, capsys, saved):
    """A run folder saved when the option existed: --resume reads it without refusing, and names
    the option only where the run had it on (off was every run's default then)."""
    import json

    from mlx_sdft.config import saved_options

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"model": "org/name", "seed": 4, "compiled_decode": saved})
    )
    assert saved_options(tmp_path)["seed"] == 4 and "compiled_decode" not in saved_options(tmp_path)
    err = capsys.readouterr().err
    assert err == (
        f"mlx-sdft: --resume: {tmp_path / 'adapter_config.json'}: compiled_decode: {RETIRED_LINE}\n"
        * 2
        if saved
        else ""
    )
