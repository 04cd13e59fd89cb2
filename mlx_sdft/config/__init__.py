"""Every training option, its default and its help text, written once.

Precedence: command-line flag > YAML file (`-c`) > (with `train --resume`: the saved run's options)
> the defaults below. The CLI builds its
flags from these fields, so a new option is one line here. Options several commands share
(where the model comes from, the data, the templates, how long answers may be) are declared
once, in small groups that each command's options inherit.

The package: `options` (defaults, `_opt`, shared groups, checks), `train` (Config), `commands`
(eval, check, generate, export) and `personal` (serve, teach, lessons, learn, versions, rollback,
forget). Everything is importable from `mlx_sdft.config`. `bundled` holds the prompts shipped in
assets/, which learn's gate options count.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

# The public names of the submodules, importable from here.
from mlx_sdft.config.commands import CheckConfig, EvalConfig, ExportConfig, GenerateConfig
from mlx_sdft.config.options import (
    Answers,
    BUDGET_FLOOR,
    COMPLETION_BUDGET,
    ChatTemplate,
    DEFAULT_HOME,
    DEFAULT_MODEL,
    DIVERGENCES,
    DataSource,
    Dequantize,
    FEEDBACK_TEMPLATE,
    HINDSIGHT_TEMPLATE,
    ModelSource,
    PAPER_SDFT,
    SFT_WEIGHT,
    SKIP_FIRST_TOKENS,
    SystemPrompt,
    TEACHER_TEMPLATE,
    TRUNCATED,
    TeacherTemplate,
    check_model,
    coerce,
)
from mlx_sdft.config.personal import (
    ForgetConfig,
    LEARN_BEFORE_THE_OPTION,
    LOOPBACK,
    LearnConfig,
    LessonsConfig,
    RollbackConfig,
    RulesConfig,
    ServeConfig,
    TeachConfig,
    VersionsConfig,
)
from mlx_sdft.config.train import (
    BEFORE_THE_OPTION,
    RESUME_MAY_CHANGE,
    RETIRED,
    SDFT_ONLY,
    Config,
    sft_ignores,
)
from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import drop_retired, read_yaml

__all__ = [
    "Answers",
    "BEFORE_THE_OPTION",
    "BUDGET_FLOOR",
    "COMPLETION_BUDGET",
    "ChatTemplate",
    "CheckConfig",
    "Config",
    "DEFAULT_HOME",
    "DEFAULT_MODEL",
    "DIVERGENCES",
    "DataSource",
    "Dequantize",
    "EvalConfig",
    "ExportConfig",
    "FEEDBACK_TEMPLATE",
    "ForgetConfig",
    "GenerateConfig",
    "HINDSIGHT_TEMPLATE",
    "LEARN_BEFORE_THE_OPTION",
    "LOOPBACK",
    "LearnConfig",
    "LessonsConfig",
    "ModelSource",
    "PAPER_SDFT",
    "RESUME_MAY_CHANGE",
    "RETIRED",
    "RollbackConfig",
    "RulesConfig",
    "SDFT_ONLY",
    "SFT_WEIGHT",
    "SKIP_FIRST_TOKENS",
    "ServeConfig",
    "SystemPrompt",
    "TEACHER_TEMPLATE",
    "TRUNCATED",
    "TeachConfig",
    "TeacherTemplate",
    "VersionsConfig",
    "check_model",
    "cli_fields",
    "coerce",
    "load_config",
    "overlay",
    "saved_options",
    "sft_ignores",
]


def cli_fields(cls: type = Config) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata["cli"]]


def overlay(lower: dict, upper: dict) -> dict:
    """`lower` updated by `upper`. --iters overrides --epochs, so an `epochs` given above without
    `iters` drops an `iters` from below: `--epochs 1` over a YAML file's `iters: 3` (or a stage's
    epochs under a stages file's iters) is what runs, not silently ignored."""
    merged = {**lower, **upper}
    if upper.get("epochs") is not None and upper.get("iters") is None:
        merged.pop("iters", None)
    return merged


def saved_options(folder: str | Path) -> dict:
    """The options that define the run saved in `folder` (its adapter_config.json; those --resume
    may change left out), an option the file predates as BEFORE_THE_OPTION says; {} without a file."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"--resume: {path}: cannot read the saved run's options ({type(e).__name__}: {e})"
        ) from None
    # A retired option the run had on is named; off (its default, saved by every run of its time) says nothing.
    drop_retired(
        {k: v for k, v in saved.items() if k in RETIRED and v},
        RETIRED,
        lambda key: f"--resume: {path}: {key}",
    )
    defining = {f.name for f in dataclasses.fields(Config)} - RESUME_MAY_CHANGE
    return {**BEFORE_THE_OPTION, **{k: v for k, v in saved.items() if k in defining}}


def load_config(
    yaml_path: str | None = None,
    overrides: dict | None = None,
    cls: type = Config,
    options: dict | None = None,
):
    """Defaults < (`train --resume`: the saved run's options) < YAML file < `options` (read from
    another file, e.g. a stages file: a null there is a value, as in the YAML file) < overrides
    (flags that were given, i.e. not None). Resuming, an option not given keeps the value the run
    was trained with, even where the default has changed since; one given differently is refused."""
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(read_yaml(yaml_path, cls))
    values = overlay(values, options or {})
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = overlay(values, flags)
    given = set(values)
    if cls is Config and values.get("resume"):
        values = overlay(saved_options(values.get("adapter_path", Config.adapter_path)), values)
    options = cls(
        **{
            k: coerce(cls, k, v, yaml_path if k in given - flags.keys() else None)
            for k, v in values.items()
        }
    ).validate()
    options.given = frozenset(
        given
    )  # the options given explicitly, not defaults or a saved run's (sft_ignores)
    return options
