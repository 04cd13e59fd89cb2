"""The options of `eval`, `check`, `generate` and `export`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_sdft.config.options import (
    DEFAULT_MODEL,
    Answers,
    BUDGET_FLOOR,
    COMPLETION_BUDGET,
    ChatTemplate,
    DataSource,
    Dequantize,
    MAX_COMPLETION_LENGTH,
    ModelSource,
    RETENTION,
    SDFT,
    SKIP_FIRST_TOKENS,
    SPEED,
    SystemPrompt,
    TeacherTemplate,
    _check_groups,
    _choices,
    _completion_budget,
    _folder,
    _opt,
    _positive,
    _required,
)
from mlx_sdft.errors import InputError


@dataclass
class EvalConfig(SystemPrompt, ChatTemplate, Answers, DataSource, Dequantize, ModelSource):
    """`mlx-sdft eval`: task metrics on held-out demonstrations, and retention."""

    adapter_path: str | None = _opt(None, "Adapter folder to evaluate; without it, the base model.")
    metric: str = _opt("normalized", "exact, normalized, regex, choice, or module:function.")
    answer_regex: str | None = _opt(
        None, "For --metric regex: the answer is group 1 (or the match)."
    )
    batch_size: int = _opt(8, "Prompts generated together.", group=SPEED)
    output: str | None = _opt(
        None, "Folder for predictions.jsonl and summary.json [default: ADAPTER_PATH/eval or eval]."
    )
    retention: bool = _opt(
        True, "With --adapter-path: measure KL(base‖adapted) on general prompts.", group=RETENTION
    )
    general_prompts: str | None = _opt(
        None,
        'JSONL of {"prompt": ...} for retention [default: the bundled 100].',
        path=True,
        group=RETENTION,
    )
    num_general_prompts: int = _opt(
        16,
        "How many general prompts to use (100: the whole bundled set, a steadier "
        "retention estimate for ~9x the time with --retention-max-tokens 64).",
        group=RETENTION,
    )
    retention_max_tokens: int = _opt(
        32, "Tokens the base model samples per general prompt.", group=RETENTION
    )
    general_max_tokens: int = _opt(
        64,
        "Most tokens per greedy answer to a general prompt (the degenerate rate; 128 sees "
        "loops that start later, for twice the time).",
        group=RETENTION,
    )
    prior_text: str | None = _opt(
        None,
        'JSONL of {"text": ...}: perplexity before and after the adapters.',
        path=True,
        group=RETENTION,
    )
    seed: int = _opt(0, "Random seed for the base model's samples.", group=RETENTION)

    def validate(self) -> EvalConfig:
        _check_groups(self)
        _positive(
            self,
            ("batch_size", "num_general_prompts", "retention_max_tokens", "general_max_tokens"),
        )
        _folder(self, "output")
        return self


@dataclass
class CheckConfig(
    SystemPrompt, TeacherTemplate, ChatTemplate, Answers, DataSource, Dequantize, ModelSource
):
    """`mlx-sdft check`: does the demonstration in context make the model better (the teacher)?"""

    num_examples: int = _opt(32, "Demonstrations to check (the first N).")
    metric: str | None = _opt(
        None, "Also score greedy answers under both contexts with this metric."
    )
    answer_regex: str | None = _opt(None, "For --metric regex.")
    num_samples: int = _opt(
        16,
        "Student completions to sample (first N prompts, each within the completion budget "
        "training gives it) and score under the teacher.",
        group=SDFT,
    )
    skip_first_tokens: int = _opt(
        SKIP_FIRST_TOKENS,
        "The --skip-first-tokens you will train with (for its warning).",
        group=SDFT,
    )
    completion_budget: float | None = _opt(
        COMPLETION_BUDGET,
        f"The --completion-budget you will train with: a sample "
        f"has at most max({BUDGET_FLOOR}, ceil(M x demonstration tokens)); 0: off.",
        group=SDFT,
    )
    max_completion_length: int = _opt(
        MAX_COMPLETION_LENGTH,
        "The --max-completion-length you will train with (every sample's cap).",
        group=SDFT,
    )
    batch_size: int = _opt(8, "Prompts scored together.", group=SPEED)
    output: str | None = _opt(
        None,
        "A .json file, or a folder to write check.json in: the numbers, the verdict and the "
        "example answers.",
    )

    def validate(self) -> CheckConfig:
        _check_groups(self)
        _positive(self, ("num_examples", "num_samples", "batch_size", "max_completion_length"))
        _completion_budget(self)
        out = Path(self.output or "")
        if (
            out.suffix.lower() != ".json" and out.is_file()
        ):  # PATH.json is a file to write; any other, a folder
            raise InputError(
                f"--output: {out} is a file; give a .json file to write, or a folder to write check.json in"
            )
        if self.skip_first_tokens < 0:
            raise InputError(f"--skip-first-tokens: must be >= 0, got {self.skip_first_tokens}")
        return self

    def output_file(self) -> Path | None:
        """Where --output writes: PATH.json itself, else DIR/check.json (an existing folder named *.json too)."""
        if not self.output:
            return None
        path = Path(self.output)
        return path if path.suffix.lower() == ".json" and not path.is_dir() else path / "check.json"


@dataclass
class GenerateConfig(SystemPrompt, ChatTemplate, Answers, Dequantize, ModelSource):
    """`mlx-sdft generate`: one answer with the chat template, with or without adapters."""

    prompt: str | None = _opt(None, "The user message.", required=True)
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

    adapter_path: str | None = _opt(
        None,
        "Adapter folder to fuse in (gguf, mlx) or convert (peft); without it, the model alone.",
    )
    format: str | None = _opt(
        None,
        "gguf (llama.cpp, Ollama, LM Studio), peft (Hugging Face PEFT adapters) or mlx "
        "(an mlx-lm folder); not given: gguf when --out ends in .gguf, else mlx.",
        ("gguf", "peft", "mlx"),
    )
    out: str | None = _opt(
        None, "The .gguf file (with a Modelfile beside it), or the folder, to write.", required=True
    )
    outtype: str = _opt(
        "f16", "GGUF weight type for matrices (norms stay float32).", ("f16", "q8_0")
    )
    force: bool = _opt(False, "Replace --out (and the Modelfile beside a .gguf) if it exists.")
    home: str | None = _opt(
        None,
        "Export what `serve --home HOME` answers with: the base model of its versions, its "
        "current adapters and (gguf) its rules and facts as the Modelfile's SYSTEM.",
    )
    rules_in_prompt: str = _opt(
        "always",
        "With --home: the rules the Modelfile's SYSTEM carries, as serve's option of that name.",
        ("always", "auto", "never"),
    )

    def validate(self) -> ExportConfig:
        if (
            self.home and self.model == DEFAULT_MODEL
        ):  # the home names its model: export checks the one it uses
            _choices(self)
        else:
            _check_groups(self)
        _required(self, ("out",))
        if self.home and self.adapter_path:
            raise InputError(
                "--adapter-path: not with --home (the home's current version is exported)"
            )
        return self
