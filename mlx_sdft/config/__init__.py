"""Every training option, its default and its help text, written once.

Precedence: command-line flag > YAML file (`-c`) > the defaults below. The CLI builds its
flags from these fields, so a new option is one line here. Options several commands share
(where the model comes from, the data, the templates, how long answers may be) are declared
once, in small groups that each command's options inherit.

The package: `options` (defaults, `_opt`, shared groups, checks), `train` (Config), `commands`
(eval, check, generate, export) and `personal` (serve, teach, lessons, learn, versions, rollback,
forget). Everything is importable from `mlx_sdft.config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The public names of the submodules, importable from here.
from mlx_sdft.config.commands import CheckConfig, EvalConfig, ExportConfig, GenerateConfig
from mlx_sdft.config.options import (
    Answers, BUDGET_FLOOR, COMPLETION_BUDGET, ChatTemplate, DEFAULT_HOME, DEFAULT_MODEL, DIVERGENCES, DataSource,
    Dequantize, FEEDBACK_TEMPLATE, HINDSIGHT_TEMPLATE, ModelSource, PAPER_SDFT, SFT_WEIGHT, SKIP_FIRST_TOKENS,
    SystemPrompt, TEACHER_TEMPLATE, TRUNCATED, TeacherTemplate, check_model, coerce,
)
from mlx_sdft.config.personal import (
    ForgetConfig, LOOPBACK, LearnConfig, LessonsConfig, RollbackConfig, ServeConfig, TeachConfig, VersionsConfig,
)
from mlx_sdft.config.train import RESUME_MAY_CHANGE, Config
from mlx_sdft.yaml_file import read_yaml

__all__ = [
    "Answers", "BUDGET_FLOOR", "COMPLETION_BUDGET", "ChatTemplate", "CheckConfig", "Config", "DEFAULT_HOME",
    "DEFAULT_MODEL", "DIVERGENCES", "DataSource", "Dequantize", "EvalConfig", "ExportConfig", "FEEDBACK_TEMPLATE",
    "ForgetConfig", "GenerateConfig", "HINDSIGHT_TEMPLATE", "LOOPBACK", "LearnConfig", "LessonsConfig",
    "ModelSource", "PAPER_SDFT", "RESUME_MAY_CHANGE", "RollbackConfig", "SFT_WEIGHT", "SKIP_FIRST_TOKENS",
    "ServeConfig", "SystemPrompt", "TEACHER_TEMPLATE", "TRUNCATED", "TeachConfig", "TeacherTemplate",
    "VersionsConfig", "check_model", "cli_fields", "coerce", "load_config", "overlay",
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


def load_config(yaml_path: str | None = None, overrides: dict | None = None, cls: type = Config):
    """Defaults < YAML file < overrides (flags that were given, i.e. not None)."""
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(read_yaml(yaml_path, cls))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = overlay(values, flags)
    return cls(**{k: coerce(cls, k, v, None if k in flags else yaml_path) for k, v in values.items()}).validate()
