"""`mlx-sdft`: parse flags, validate, call the library. No math and no loops here.

Each command's flags are generated from its options dataclass in mlx_sdft.config, so every default
and help text is written once. Every command runs through `_one_line_errors`, where `EXIT_STATUS`
turns what a job raises into one line and an exit status.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
from contextlib import contextmanager
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlx_sdft import package_versions
from mlx_sdft.config import (
    CheckConfig,
    Config,
    EvalConfig,
    ExportConfig,
    ForgetConfig,
    GenerateConfig,
    LearnConfig,
    LessonsConfig,
    RollbackConfig,
    RulesConfig,
    ServeConfig,
    TeachConfig,
    VersionsConfig,
    cli_fields,
    load_config,
)
from mlx_sdft.config.options import ESSENTIALS, GROUPS, shown_options
from mlx_sdft.config.personal import LEARN_TAKES_TRAIN
from mlx_sdft.errors import InputError, Interrupted, Rejected, TrainingError, one_line
from mlx_sdft.yaml_file import drop_retired

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Self-Distillation Fine-Tuning (SDFT) on MLX."
)

_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list[str]}


def _option(
    f: dataclasses.Field,
    hidden: bool = False,
    argument: bool = False,
    required: bool = False,
    help: str | None = None,
) -> inspect.Parameter:
    """One flag (or argument) for an option field, in its group's panel; an engine knob (`hidden`), or
    one `hidden` asks for, is accepted but not shown. A required option says so ("[required]", the one
    mark; `required`: an argument this command cannot go without); an option that is off or unset by
    default (None, an empty list) shows no default, its help says what happens without it. `help`: this
    command's own text for a field several commands share. A flag shows no type: it takes no value."""
    kind = _TYPES[f.type.split(" | ")[0]]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    shown = repr(default) if isinstance(default, str) and "\n" in default else default
    help = help or f.metadata["help"]
    argument = argument or f.metadata["argument"]
    if f.metadata["required"] or required:
        help += " [required]"
    elif default is not None and default != [] and not argument:
        help += f" [default: {shown}]"
    if f.metadata["choices"]:
        help += f" [choices: {', '.join(f.metadata['choices'])}]"
    # Escaped: typer renders help with rich, which would eat "[default: …]" as a markup tag.
    if argument:  # named in capitals, as the usage line shows it
        info = typer.Argument(help=escape(help), show_default=False, metavar=f.name.upper())
    else:
        info = typer.Option(
            *filter(None, [f.metadata["flag"]]),
            help=escape(help),
            show_default=False,
            rich_help_panel=f.metadata["group"],
            hidden=hidden or f.metadata["hidden"],
            metavar="" if kind is bool else None,
        )
    return inspect.Parameter(
        f.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[kind], info],
    )


class _PlainHelp:
    """--help shows as the plain flag it is, with no value type."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _PlainHelpCommand(_PlainHelp, typer.core.TyperCommand):
    def collect_usage_pieces(self, ctx) -> list[str]:
        """A required argument without brackets: the options' validate() requires it (its help says
        "[required]", the one mark of a required option), so the parser leaves it optional."""
        pieces = super().collect_usage_pieces(ctx)
        needed = {
            p.display_name_raw
            for p in self.params
            if p.param_type_name == "argument" and (p.help or "").endswith("[required]")
        }
        return [piece[1:-1] if piece[1:-1] in needed else piece for piece in pieces]


class _PlainHelpGroup(_PlainHelp, typer.core.TyperGroup):
    pass


app.info.cls = _PlainHelpGroup  # the root's own --help too


def _fields(options: type, names: tuple[str, ...] | None) -> list[dataclasses.Field]:
    return [f for f in cli_fields(options) if names is None or f.name in names]


# What a job raises → exit status: bad input 2, a run that cannot go on 1, the gate said no 3
# (Rejected is a TrainingError, so it comes first), Ctrl-C 130 (the
# shell's 128 + SIGINT). Anything else is a bug and keeps its traceback.
EXIT_STATUS = {
    InputError: 2,
    Rejected: 3,
    TrainingError: 1,
    Interrupted: 130,
    KeyboardInterrupt: 130,
}
# How each command that saves its progress carries on after a Ctrl-C.
RESUME_HINT = {
    "train": "continue with the same command plus --resume",
    "continual": "run the same command again: finished stages are kept, the interrupted one starts over",
    "learn": "the candidate is removed and the current version unchanged; run learn again",
}


@contextmanager
def _one_line_errors(name: str):
    """The single wrapper of every command: an exception of `EXIT_STATUS` becomes one line on
    stderr and its exit status; a Ctrl-C also says how to carry on."""
    try:
        yield
    except tuple(EXIT_STATUS) as e:
        status = next(code for kind, code in EXIT_STATUS.items() if isinstance(e, kind))
        if status == 130:
            hint = RESUME_HINT.get(name) if getattr(e, "saved", True) else None
            typer.echo(
                f"mlx-sdft {name}: {str(e) or 'interrupted'}" + (f"; {hint}" if hint else ""),
                err=True,
            )
        else:
            typer.echo(f"mlx-sdft {name}: error: {one_line(e)}", err=True)
        raise typer.Exit(status)


def _command(
    name: str,
    options: type,
    action: Callable,
    help: str,
    yaml_help: str | None,
    names: tuple[str, ...] | None = None,
    under: typer.Typer = app,
    shown_from: type | None = None,
    epilog: str | None = None,
    fixed: dict | None = None,
    argument: str | None = None,
    hidden: bool = False,
    hide: tuple[str, ...] = (),
    required: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """Register `mlx-sdft NAME` with one flag per field of `options` (or only those in `names`)
    and, with `yaml_help`, `-c/--config YAML`. With `shown_from`, only the fields that class declares
    itself (or gives its own default: config.options.shown_options) are shown in --help; the inherited ones are accepted all the same (`epilog` says so).
    `fixed`: option values the command itself sets (`exchanges list` is teach's --list);
    `argument`: the field taken as the positional argument (`lessons export FILE`); `hide`: fields
    accepted but not shown (an old spelling); `hidden`: the command itself is not listed; `required`:
    fields this command cannot go without; `helps`: this command's own help of a shared field. The retired
    options of `options` (`RETIRED`, on/off flags) are accepted, not shown, and ignored with one line."""

    full_name, retired = f"{under.info.name or ''} {name}".strip(), getattr(options, "RETIRED", {})

    def command(config: Optional[str] = None, **flags) -> None:
        given = {key: flags.pop(key) for key in retired}
        drop_retired(
            {k: v for k, v in given.items() if v is not None},
            retired,
            lambda key: f"{full_name} --{key.replace('_', '-')}",
        )
        with _one_line_errors(full_name):
            action(load_config(config, {**flags, **(fixed or {})}, options))

    config = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Optional[str],
            typer.Option("-c", "--config", help=yaml_help, rich_help_panel=ESSENTIALS),
        ],
    )
    own = shown_options(shown_from) if shown_from else None
    fields = sorted(
        _fields(options, names), key=lambda f: GROUPS.index(f.metadata["group"])
    )  # panels in GROUPS' order
    fields.sort(key=lambda f: f.name != argument)  # the positional argument first
    flags = [
        _option(
            f,
            hidden=own is not None and f.name not in own or f.name in hide,
            argument=f.name == argument,
            required=f.name in required,
            help=(helps or {}).get(f.name),
        )
        for f in fields
    ]
    flags += [
        inspect.Parameter(
            key,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Optional[bool], typer.Option(hidden=True)],
        )
        for key in retired
    ]
    command.__signature__ = inspect.Signature([config] * bool(yaml_help) + flags)
    command.__doc__ = help
    under.command(name, help=help, epilog=epilog, hidden=hidden, cls=_PlainHelpCommand)(command)


def _train(cfg: Config) -> None:
    from mlx_sdft.jobs.train import (
        run_train,
    )  # heavy imports only once the options are known to be good

    run_train(cfg)
    if cfg.dry_run:
        return
    from mlx_sdft.formats.models import resolve

    model = (
        resolve(cfg.model, cfg.dequantize) if cfg.model.endswith(".gguf") else cfg.model
    )  # mlx-lm reads no GGUF
    typer.echo(
        f"Adapters saved to {cfg.adapter_path}. Use them with:\n"
        f'  mlx_lm.generate --model {model} --adapter-path {cfg.adapter_path} --prompt "..."'
    )


def _eval(cfg: EvalConfig) -> None:
    from mlx_sdft.jobs.evaluate import run_eval

    summary = run_eval(cfg)
    typer.echo(" ".join(f"{k}={v:.4f}" for k, v in summary.items() if isinstance(v, float)))


def _check(cfg: CheckConfig) -> None:
    from mlx_sdft.jobs.check import run_check

    report = run_check(cfg)
    typer.echo(report["verdict"])
    if "warning" in report:
        typer.echo(f"warning: {report['warning']}")
    typer.echo(report["recommendation"])
    if "small_model" in report:
        typer.echo(f"note: {report['small_model']}")


def _continual(
    stages: Annotated[
        Optional[str], typer.Option("-c", "--config", help=escape("Stages YAML file. [required]"))
    ] = None,
    restart_from: Annotated[
        Optional[str],
        typer.Option(help="Retrain this stage and every stage after it, though they finished."),
    ] = None,
) -> None:
    """Train stage after stage on the same adapters; evaluate every task and retention after each."""
    from mlx_sdft.jobs.continual import run_continual

    with _one_line_errors("continual"):
        if stages is None:
            raise InputError("-c/--config: required (the stages YAML file)")
        run_continual(stages, restart_from=restart_from)


_command(
    "train",
    Config,
    _train,
    "Train LoRA adapters with SDFT (or --method sft) on demonstrations.",
    "YAML file with options (flags override it).",
)
_command(
    "eval",
    EvalConfig,
    _eval,
    "Greedy answers on held-out demonstrations: task metric and retention.",
    "YAML file with eval options.",
)
_command(
    "check",
    CheckConfig,
    _check,
    "Does the model learn from the demonstration in context? The teacher check.",
    "YAML file with check options.",
)
app.command("continual", help=_continual.__doc__, cls=_PlainHelpCommand)(_continual)


def _serve(cfg: ServeConfig) -> None:
    from mlx_sdft.serve.server import run

    run(cfg)


def _printing(name: str, ask: Callable | None = None, job: str = "teach") -> Callable:
    """Run `jobs.JOB.NAME(options)` and print its lines; `ask(options)` may return a question to
    confirm first (a deletion) and the line a "no" ends with, skipped with --yes. jobs.learn's also
    get a stderr console."""

    def run(cfg) -> None:
        module = importlib.import_module(f"mlx_sdft.jobs.{job}")
        asked = ask(cfg) if ask and not cfg.yes else None
        if asked:
            _confirm(*asked)
        console = (
            {"console": Console(stderr=True)}
            if job in ("learn", "rules") and name != "listing"
            else {}
        )
        for line in getattr(module, name)(cfg, **console):
            typer.echo(line)

    return run


# A "no" to a confirmation: click's Abort status, not Ctrl-C's 130.
DECLINED = 1


def _confirm(question: str, kept: str) -> None:
    """Ask before a deletion; a "no" ends with the one line `kept` (what stays) and status DECLINED.
    With no terminal to ask on (stdin at its end: a script, a pipe), the one line says to pass --yes
    instead of aborting at the prompt."""
    # An answer read from a pipe is not echoed: the prompt's line is ended here instead.
    piped = sys.stdin is None or not sys.stdin.isatty()
    try:
        yes = typer.confirm(question)
    except typer.Abort:  # Ctrl-C or the end of stdin
        if piped:
            typer.echo("")
            raise InputError(
                "no answer to the question (no terminal to ask on): pass --yes to delete without "
                "asking"
            ) from None
        raise
    if piped:
        typer.echo("")
    if not yes:
        typer.echo(kept, err=True)
        raise typer.Exit(DECLINED)


def _deprecated(old: str, new: str) -> None:
    """One line on stderr for an old spelling that still works for one release."""
    typer.echo(
        f"mlx-sdft {old}: deprecated, use `mlx-sdft {new}` (the old spelling goes in the next release)",
        err=True,
    )


def _noun(
    name: str,
    help: str,
    listing: Callable,
    options: type,
    names: tuple[str, ...],
    moved: dict[str, str] | None = None,
    fixed: dict | None = None,
    hide: tuple[str, ...] = (),
) -> typer.Typer:
    """`mlx-sdft NAME`: a noun whose subcommands act on it; alone (or with its listing options) it lists.
    `moved`: listing options that are an old spelling of a subcommand, accepted with a deprecation line;
    `hide`: options accepted but not shown (those only an old spelling takes)."""
    noun = typer.Typer(
        name=name,
        no_args_is_help=False,
        invoke_without_command=True,
        help=help,
        cls=_PlainHelpGroup,
    )
    app.add_typer(noun)

    def callback(ctx: typer.Context, **flags) -> None:
        if ctx.invoked_subcommand is None:
            with _one_line_errors(name):
                cfg = load_config(None, {**flags, **(fixed or {})}, options)
                for field, new in (moved or {}).items():
                    if getattr(cfg, field):
                        _deprecated(f"{name} --{field.replace('_', '-')}", f"{name} {new}")
                listing(cfg)

    callback.__signature__ = inspect.Signature(
        [
            inspect.Parameter(
                "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
            ),
            *(
                _option(f, hidden=f.name in (moved or {}) or f.name in hide)
                for f in _fields(options, names)
            ),
        ]
    )
    callback.__doc__ = help
    noun.callback(invoke_without_command=True)(callback)
    return noun


_command(
    "serve",
    ServeConfig,
    _serve,
    "Serve the model with its current adapters (OpenAI-compatible), keeping "
    "every exchange in --home.",
    "YAML file with serve options.",
)
# teach's old spellings of what the nouns below do: accepted for one release, with a deprecation line.
_TEACH_MOVED = {
    "list": "exchanges list",
    "forget_exchanges": "exchanges forget",
    "import_file": "lessons import FILE",
}


def _forget_exchanges_question(cfg) -> tuple[str, str]:
    return f"Delete every exchange in {cfg.home}?", "exchanges kept: nothing deleted"


def _teach(cfg: TeachConfig) -> None:
    for field, new in _TEACH_MOVED.items():
        if getattr(cfg, field):
            _deprecated(
                f"teach --{'import' if field == 'import_file' else field.replace('_', '-')}", new
            )
    _printing("teach", lambda cfg: cfg.forget_exchanges and _forget_exchanges_question(cfg))(cfg)


_command(
    "teach",
    TeachConfig,
    _teach,
    "Correct a stored exchange (EXCHANGE --answer, --feedback), or give a standing "
    "rule or fact (--rule, --fact).",
    None,
    hide=(*_TEACH_MOVED, "limit", "yes"),
)
_EXCHANGE_LIST = ("home", "limit")
exchanges_app = _noun(
    "exchanges",
    "The exchanges in --home (what serve answered): list, forget.",
    _printing("teach"),
    TeachConfig,
    _EXCHANGE_LIST,
    fixed={"list": True},
)
_command(
    "list",
    TeachConfig,
    _printing("teach"),
    "List the stored exchanges, newest first.",
    None,
    _EXCHANGE_LIST,
    exchanges_app,
    fixed={"list": True},
)
_command(
    "forget",
    TeachConfig,
    _printing("teach", _forget_exchanges_question),
    "Delete every stored exchange (lessons keep a copy of their prompt) and compact the store.",
    None,
    ("home", "yes"),
    exchanges_app,
    fixed={"forget_exchanges": True},
)

_LESSON_LIST = ("home", "json", "state", "export", "force")
lessons_app = _noun(
    "lessons",
    "The lessons in --home: list, show ID, add EXCHANGE, import FILE, export FILE, delete "
    "ID, purge.",
    _printing("listing"),
    LessonsConfig,
    _LESSON_LIST,
    moved={"export": "export FILE"},
    hide=("force",),  # lessons --export's
)
_command(
    "list",
    LessonsConfig,
    _printing("listing"),
    "List the lessons that are not deleted (--state: only those).",
    None,
    ("home", "json", "state"),
    lessons_app,
)
_command(
    "show",
    LessonsConfig,
    _printing("show"),
    "Show one lesson in full, with its teacher's context.",
    None,
    ("lesson", "home", "json"),
    lessons_app,
)
_command(
    "add",
    TeachConfig,
    _printing("teach"),
    "Turn a stored exchange into a lesson: --answer (the answer you "
    "wanted) or --feedback (what was wrong, in words; --always: a standing rule).",
    None,
    ("exchange", "home", "answer", "feedback", "always", "check", "feedback_template", "redact"),
    lessons_app,
)
_command(
    "import",
    TeachConfig,
    _printing("teach"),
    "Add every example of a .jsonl file (the formats `train` reads) as lessons, or none.",
    None,
    ("import_file", "home", "redact"),
    lessons_app,
    argument="import_file",
)
_command(
    "export",
    LessonsConfig,
    _printing("listing"),
    "Write the lessons as .jsonl for `mlx-sdft train --data`.",
    None,
    ("export", "home", "state", "force"),
    lessons_app,
    argument="export",
)
_command(
    "delete",
    LessonsConfig,
    _printing("delete"),
    "Delete one lesson (its texts are erased).",
    None,
    ("lesson", "home"),
    lessons_app,
)
_command(
    "purge",
    LessonsConfig,
    _printing(
        "purge",
        lambda cfg: (f"Delete every lesson in {cfg.home}?", "lessons kept: nothing deleted"),
    ),
    "Delete every lesson and compact the store.",
    None,
    ("home", "yes"),
    lessons_app,
)

_RULE_LIST = ("home", "json")
_RULE_MEASURE = ("model", "gate_prompts", "gate_max_tokens", "gate_batch_size")
rules_app = _noun(
    "rules",
    "Standing rules and facts in --home: list, add TEXT, check [ID], remove ID.",
    _printing("listing", job="rules"),
    RulesConfig,
    _RULE_LIST,
)
_command(
    "list",
    RulesConfig,
    _printing("listing", job="rules"),
    "List the rules and facts: state, check, how the model follows each one.",
    None,
    _RULE_LIST,
    rules_app,
)
_command(
    "add",
    RulesConfig,
    _printing("add", job="rules"),
    "Add a rule (or --fact): in serve's prompt from its next "
    "request; then measure whether the model follows it when told (--no-preflight: skip).",
    None,
    ("text", "home", "fact", "check", "preflight", *_RULE_MEASURE),
    rules_app,
    required=("text",),
)
_command(
    "check",
    RulesConfig,
    _printing("check", job="rules"),
    "Measure whether the model (current version) follows "
    "a rule when told, on held-out prompts: every rule, or RULE.",
    None,
    ("rule", "home", *_RULE_MEASURE),
    rules_app,
    helps={"rule": "The rule's id (see mlx-sdft rules) [default: every rule]."},
)
_command(
    "remove",
    RulesConfig,
    _printing(
        "remove",
        lambda cfg: importlib.import_module("mlx_sdft.jobs.rules").removal_question(cfg),
        job="rules",
    ),
    "Remove a rule from the store, serve's prompt and "
    "every version that learned it (as forget: the current version is rebuilt without it).",
    None,
    ("rule", "home", "yes"),
    rules_app,
)


def _learn(cfg: LearnConfig) -> None:
    from mlx_sdft.jobs.learn import run_learn

    record = run_learn(cfg, console=Console(stderr=True))
    typer.echo(
        f"version {record['version']} is current: learned lessons {record['lessons']} "
        f"(+{len(record['replayed'])} replayed); see mlx-sdft versions --home {cfg.home}"
    )


_command(
    "learn",
    LearnConfig,
    _learn,
    "Learn the new lessons in --home (plus replay) into a candidate version; the "
    "gate accepts it (it becomes current) or rejects it (exit status 3, current unchanged).",
    "YAML file with learn and train options (flags override it).",
    shown_from=LearnConfig,
    epilog=escape(LEARN_TAKES_TRAIN),
)
versions_app = _noun(
    "versions",
    "The adapter versions in --home: list (parent, lessons, gate numbers, accepted or "
    "rejected), rollback [VERSION].",
    _printing("run_versions", job="learn"),
    VersionsConfig,
    ("home", "json"),
)
_command(
    "list",
    VersionsConfig,
    _printing("run_versions", job="learn"),
    "The adapter versions in --home: parent, lessons, gate numbers, accepted or rejected.",
    None,
    None,
    versions_app,
)
_ROLLBACK_HELP = (
    "Serve an earlier accepted version (default: the current one's parent; 0: no adapters)."
)
_command(
    "rollback",
    RollbackConfig,
    _printing("run_rollback", job="learn"),
    _ROLLBACK_HELP,
    None,
    None,
    versions_app,
)


def _rollback(cfg: RollbackConfig) -> None:
    _deprecated("rollback", "versions rollback")
    _printing("run_rollback", job="learn")(cfg)


_command("rollback", RollbackConfig, _rollback, _ROLLBACK_HELP, None, hidden=True)
_command(
    "forget",
    ForgetConfig,
    _printing("run_forget", job="learn"),
    "Delete a lesson and its exchange, erase the versions that learned it, rebuild without it.",
    None,
)


def _export(cfg: ExportConfig) -> None:
    from mlx_sdft.jobs.export import run_export

    done = run_export(cfg)
    out = done["out"]
    if done["format"] == "gguf":
        typer.echo(
            f"wrote {out} and {done['modelfile']}; run it with:\n"
            f"  ollama create {out.stem} -f {done['modelfile']} && ollama run {out.stem}\n"
            f"  llama-cli -m {out} -cnv        (llama.cpp)\n  lms import {out}        (LM Studio)"
        )
    elif done["format"] == "peft":
        typer.echo(
            f"wrote {out}; load it with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), {str(out)!r})"
        )
    else:
        typer.echo(f"wrote {out}; use it with: mlx_lm.generate --model {out}")


_command(
    "export",
    ExportConfig,
    _export,
    "Write the model with its adapters for llama.cpp/Ollama/LM Studio (gguf), "
    "Hugging Face PEFT (peft) or mlx-lm (mlx).",
    "YAML file with export options.",
)


def _generate(cfg: GenerateConfig) -> None:
    from mlx_lm import generate as mlx_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_sdft.core.prompts import encode, render, with_system_prompt
    from mlx_sdft.machine.report import make_console
    from mlx_sdft.opening import open_model_for

    model, tokenizer, _ = open_model_for(cfg, adapters=cfg.adapter_path, console=make_console())
    messages = with_system_prompt([{"role": "user", "content": cfg.prompt}], cfg.system_prompt)
    ids = encode(tokenizer, render(tokenizer, messages))
    answer = mlx_generate(
        model, tokenizer, ids, max_tokens=cfg.max_tokens, sampler=make_sampler(temp=cfg.temperature)
    )
    typer.echo(answer.rstrip("\n"))  # one newline after the answer, as a shell prompt expects


_command(
    "generate",
    GenerateConfig,
    _generate,
    "Answer one prompt with the chat template (mlx-lm's generation), with or without adapters.",
    "YAML file with generate options.",
)


@app.command("doctor", cls=_PlainHelpCommand)
def doctor() -> None:
    """Print what MLX sees on this machine: backend (Metal, CUDA, CPU), device, memory, BLAS, versions."""
    from mlx_sdft.machine.doctor import report

    with _one_line_errors("doctor"):
        lines = report().items()
    for key, value in lines:
        typer.echo(f"{key:>15}: {value}")


def _version(given: bool) -> None:
    if given:
        typer.echo(" ".join(f"{name} {v}" for name, v in package_versions().items()))
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version,
        is_eager=True,
        metavar="",
        help="Print the versions and exit.",
    ),
) -> None:
    """Self-Distillation Fine-Tuning (SDFT) on MLX."""


def _command_path(args: list[str]) -> list[str]:
    """The (sub)command names `args` start with: ["lessons", "show"] of `lessons show 3 --json`."""
    command, names = typer.main.get_command(app), []
    for arg in args:
        sub = getattr(command, "commands", {}).get(arg)
        if sub is None:
            break
        command = sub
        names.append(arg)
    return names


def main() -> None:
    """The console script: like `app()`, but a flag that does not parse is one line, status 2."""
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # typer's (vendored click) usage and parameter errors
        if type(e).__name__ == "NoArgsIsHelpError":
            app(["--help"], standalone_mode=False)
            sys.exit(0)
        ctx, names = getattr(e, "ctx", None), []
        while ctx is not None and ctx.parent is not None:  # "lessons show", not just "show"
            names.insert(0, ctx.info_name)
            ctx = ctx.parent
        if (
            getattr(e, "ctx", None) is None
        ):  # the flag parser's errors carry no context: the command from argv
            names = _command_path(sys.argv[1:])
        command = " ".join(["mlx-sdft", *names])
        typer.echo(f"{command}: error: {e.format_message()}", err=True)
        code = getattr(e, "exit_code", 2)
    except typer.Abort:
        code = 130
    sys.exit(code or 0)
