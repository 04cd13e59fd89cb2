"""docs/options.md, generated from the option fields: every command's options, grouped as `--help`
shows them, with their defaults and help, the hidden engine knobs included.

    python -m mlx_sdft.config.docs > docs/options.md

tests/cli/test_cli.py fails when docs/options.md is not what this prints.
"""

from __future__ import annotations

import dataclasses

from mlx_sdft.config.commands import CheckConfig, EvalConfig, ExportConfig, GenerateConfig
from mlx_sdft.config.options import (
    FEEDBACK_TEMPLATE,
    GROUPS,
    HINDSIGHT_TEMPLATE,
    TEACHER_TEMPLATE,
    shown_options,
)
from mlx_sdft.config.personal import (
    LEARN_TAKES_TRAIN,
    ForgetConfig,
    LearnConfig,
    LessonsConfig,
    RollbackConfig,
    RulesConfig,
    ServeConfig,
    TeachConfig,
    VersionsConfig,
)
from mlx_sdft.config.train import Config

# (command, its options, reads -c YAML, the docs page that explains it)
COMMANDS = (
    ("train", Config, True, "training.md"),
    ("eval", EvalConfig, True, "evaluate.md"),
    ("check", CheckConfig, True, "evaluate.md"),
    ("generate", GenerateConfig, True, "training.md"),
    ("export", ExportConfig, True, "export.md"),
    ("serve", ServeConfig, True, "personal.md"),
    ("teach", TeachConfig, False, "personal.md"),
    ("lessons", LessonsConfig, False, "personal.md"),
    ("rules", RulesConfig, False, "personal.md"),
    ("learn", LearnConfig, True, "personal.md"),
    ("versions", VersionsConfig, False, "personal.md"),
    ("versions rollback", RollbackConfig, False, "personal.md"),
    ("forget", ForgetConfig, False, "personal.md"),
)
_TEMPLATES = {
    TEACHER_TEMPLATE: "TEACHER_TEMPLATE",
    FEEDBACK_TEMPLATE: "FEEDBACK_TEMPLATE",
    HINDSIGHT_TEMPLATE: "HINDSIGHT_TEMPLATE",
}

INTRO = """\
# Options

Every option of every command, grouped as `--help` shows them. Generated from `mlx_sdft/config/`
(`python -m mlx_sdft.config.docs > docs/options.md`); a test fails when this page is out of date.

**Where options come from.** A flag beats the YAML file given with `-c` (same names, underscored:
`learning_rate: 1e-4`), which beats the default (`train --resume`: the saved run's options come
between the file and the defaults). `--epochs` given as a flag also beats the file's `iters`. A
`null` in a YAML file is a value, not "the default": it turns off an option that can be off
(`completion_budget: null`, `topk`, `iters`, `max_degenerate_rise`) and is refused, with the file
and line, for any other. A relative path in a YAML file (model, data, templates, prompt files, a
stages file) is taken from the file's folder when it exists there, else as written. An unknown key
or a value of the wrong type is one line naming the file and line, exit status 2.

**Hidden options.** Options marked *hidden* are engine knobs: they change how the same numbers
are computed, not what is trained, and the memory preflight sets two of them by itself. They are
accepted (flag or YAML) but left out of `--help`; [performance.md](performance.md) measures them.

`continual` takes `-c STAGES.yaml` and `--restart-from NAME` ([evaluate.md](evaluate.md)); `doctor`
takes none. `exchanges list|forget` and `lessons add|import` take teach's options below (`--limit`,
`--yes`, `--answer` ...); teach's own `--list`, `--import` and `--forget-exchanges` are their old
spellings, accepted with a line saying what replaces them. `lora_parameters` (train, learn) is YAML only: `{rank: 8, scale: 20.0, dropout: 0.0}`,
mlx-lm's defaults; a file may give some of them (`{rank: 16}` keeps the others) and mlx-lm's `keys`.
"""


def _default(f: dataclasses.Field) -> str:
    if f.metadata["required"]:
        return "*required*"
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default is True or default is False:
        return "on" if default else "off"
    if default is None or default == [] or default == {}:
        return ""
    if isinstance(default, str) and default in _TEMPLATES:
        return f"`{_TEMPLATES[default]}`"
    return f"`{default}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flag(f: dataclasses.Field) -> str:
    if f.metadata["argument"]:
        return f.name.upper()
    flag = f.metadata["flag"] or f"--{f.name.replace('_', '-')}"
    return f"`{flag}`"


def _table(fields: list[dataclasses.Field]) -> list[str]:
    lines = []
    for group in GROUPS:
        rows = [f for f in fields if f.metadata["group"] == group]
        if not rows:
            continue
        lines += ["", f"**{group}**", "", "| option | default | meaning |", "|---|---|---|"]
        for f in rows:
            help = _cell(f.metadata["help"])
            if f.metadata["hidden"]:
                help = f"*hidden.* {help}"
            if f.metadata["choices"]:
                help += f" One of {', '.join(f'`{c}`' for c in f.metadata['choices'])}."
            lines.append(f"| {_flag(f)} | {_default(f)} | {help} |")
    return lines


def markdown() -> str:
    lines = [INTRO.rstrip("\n")]
    lines += ["", " · ".join(f"[{name}](#{name.replace(' ', '-')})" for name, *_ in COMMANDS)]
    for name, cls, yaml, page in COMMANDS:
        fields = [f for f in dataclasses.fields(cls) if f.metadata["cli"]]
        own = shown_options(cls)
        lines += [
            "",
            f"## {name}",
            "",
            (
                f"`mlx-sdft {name} --help`; "
                + ("`-c FILE.yaml` reads these options from a file; " if yaml else "")
                + f"explained in [{page}]({page})."
            ),
        ]
        if cls is LearnConfig:
            fields = [f for f in fields if f.name in own]
        lines += _table(fields)
        if cls is LearnConfig:
            lines += ["", LEARN_TAKES_TRAIN.replace("`mlx-sdft train --help`", "[train](#train)")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
