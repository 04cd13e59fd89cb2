"""`mlx-sdft train`'s options (Config), and which of them `--resume` may change."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from mlx_sdft.config.options import (
    BUDGET_FLOOR,
    COMPLETION_BUDGET,
    ChatTemplate,
    DIVERGENCES,
    DataSource,
    Dequantize,
    GUARDS,
    MAX_COMPLETION_LENGTH,
    MODEL,
    ModelSource,
    OPTIMIZER,
    REPORTING,
    SDFT,
    SFT_WEIGHT,
    SKIP_FIRST_TOKENS,
    SPEED,
    SystemPrompt,
    TRUNCATED,
    TeacherTemplate,
    _check_groups,
    _completion_budget,
    _folder,
    _opt,
    _positive,
)
from mlx_sdft.errors import InputError


_LORA_DEFAULTS = {
    "rank": 8,
    "scale": 20.0,
    "dropout": 0.0,
}  # mlx-lm's; a YAML file may give some of them

# Options the product no longer has, and what runs instead: as a flag, a YAML key (a -c file, a
# stages file, a --learn-config) or a saved run's option, accepted for one release and ignored,
# with one line saying so (yaml_file.drop_retired).
RETIRED = {
    "compiled_decode": "the compiled decode step is retired; sampling runs the plain decode loop"
}


@dataclass
class Config(SystemPrompt, TeacherTemplate, ChatTemplate, DataSource, Dequantize, ModelSource):
    RETIRED: ClassVar[dict[str, str]] = RETIRED

    # What to train on and where to write (model, dequantize, data, max_seq_length and the
    # templates come from the groups above).
    adapter_path: str = _opt(
        "adapters", "Output folder for adapters, checkpoints and metrics.", resume_may_change=True
    )
    method: str = _opt(
        "sdft",
        "sdft, or sft: plain next-token cross-entropy on the demonstrations, to compare.",
        ("sdft", "sft"),
    )

    # Which weights train (mlx-lm's LoRA layers and file format).
    fine_tune_type: str = _opt("lora", "Adapter type.", ("lora", "dora", "full"), group=MODEL)
    num_layers: int = _opt(
        16, "Number of transformer blocks (from the last) to adapt; -1 for all.", group=MODEL
    )
    lora_parameters: dict = _opt(
        _LORA_DEFAULTS,
        "LoRA rank, scale and dropout (mlx-lm's defaults); YAML only.",
        cli=False,
        group=MODEL,
    )
    resume_adapter_file: str | None = _opt(
        None, "Start from these adapter weights (mlx-lm style).", group=MODEL
    )
    resume: bool = _opt(
        False,
        "Continue the run saved in --adapter-path: adapters, optimizer, teacher, data position.",
        resume_may_change=True,
    )
    overwrite: bool = _opt(
        False,
        "Start a new run in an --adapter-path that holds one: its run files are deleted first.",
        resume_may_change=True,
    )

    # Optimization (AdamW with weight decay 0, cosine schedule with warmup, clip 1.0: the paper's).
    batch_size: int = _opt(4, "Prompts per micro-batch.", group=OPTIMIZER)
    grad_accumulation_steps: int = _opt(1, "Micro-batches per optimizer step.", group=OPTIMIZER)
    iters: int | None = _opt(None, "Optimizer steps; overrides --epochs when given.")
    epochs: float = _opt(2.0, "Passes over the training prompts (paper: 2).")
    learning_rate: float = _opt(1e-5, "Peak learning rate.")
    optimizer: str = _opt("adamw", "Optimizer.", ("adamw", "adam", "sgd"), group=OPTIMIZER)
    weight_decay: float = _opt(0.0, "AdamW weight decay.", group=OPTIMIZER)
    warmup_ratio: float = _opt(
        0.1, "Fraction of steps of linear warmup before the cosine decay.", group=OPTIMIZER
    )
    grad_clip: float = _opt(
        1.0, "Clip the global gradient norm to this (0 disables).", group=OPTIMIZER
    )
    seed: int = _opt(0, "Random seed for data order, LoRA init and sampling.", group=OPTIMIZER)
    grad_checkpoint: bool = _opt(
        False,
        "Recompute activations in the backward pass to save memory "
        "(the student's pass only: sampling and the teacher run plain).",
        group=SPEED,
        resume_may_change=True,
    )

    # SDFT.
    teacher: str = _opt(
        "ema",
        "Teacher weights: EMA of the student, the base model, or the student.",
        ("ema", "base", "live"),
        group=SDFT,
        sdft_only=True,
    )
    teacher_update_rate: float = _opt(
        0.01,
        "EMA rate r: teacher <- (1 - r) teacher + r student, after every step.",
        group=SDFT,
        sdft_only=True,
    )
    divergence: str = _opt(
        "forward",
        "forward = KL(teacher‖student), reverse = KL(student‖teacher), jsd.",
        DIVERGENCES,
        group=SDFT,
        sdft_only=True,
    )
    beta: float = _opt(
        0.5, "JSD mixture weight of the teacher (--divergence jsd).", group=SDFT, sdft_only=True
    )
    num_generations: int = _opt(1, "Sampled completions per prompt.", group=SDFT, sdft_only=True)
    fuse_sampling: bool = _opt(
        True,
        "Sample with the LoRA adapters fused into a copy of their base weights: one "
        "matmul per adapted linear instead of three, the same policy up to rounding, for the "
        "memory of the copy; the preflight turns it off when only the unfused run fits. "
        "Adapters over quantized weights are never fused.",
        group=SPEED,
        hidden=True,
        resume_may_change=True,
        sdft_only=True,
    )
    max_completion_length: int = _opt(
        MAX_COMPLETION_LENGTH, "Most tokens sampled per completion.", group=SDFT, sdft_only=True
    )
    temperature: float = _opt(
        1.0, "Sampling temperature (also divides the scored logits).", group=SDFT, sdft_only=True
    )
    top_p: float = _opt(1.0, "Nucleus sampling mass.", group=SDFT, sdft_only=True)
    skip_first_tokens: int = _opt(
        SKIP_FIRST_TOKENS,
        "Completion tokens at the start left out of the loss.",
        group=SDFT,
        sdft_only=True,
    )
    logits_chunk: int = _opt(
        0,
        "Score the completion this many positions at a time: the [B, T, V] logits of student "
        "and teacher are never whole in memory, for a second LM-head pass in the backward; the "
        "same loss. 0: at once (the preflight picks 16 when only a chunked run fits).",
        group=SPEED,
        hidden=True,
        resume_may_change=True,
        sdft_only=True,
    )
    topk: int | None = _opt(
        None,
        "Score on the teacher's top-K tokens plus a tail bucket (less memory); default: the full vocabulary.",
        group=SPEED,
        sdft_only=True,
    )

    # Guards against a collapsing student (core/guards.py). The budget, the mask and the SFT term are
    # on by default (recipes/retention-small; docs/method.md); the base-KL term and the stop are off.
    completion_budget: float | None = _opt(
        COMPLETION_BUDGET,
        f"Sample at most max({BUDGET_FLOOR}, ceil(M x demonstration "
        "tokens)) per example, capped by --max-completion-length; 0: off (the cap).",
        group=GUARDS,
        sdft_only=True,
        before_the_option=None,
    )
    truncated: str = _opt(
        TRUNCATED,
        "A completion truncated without a stop token: keep it in the loss, or mask it out.",
        ("keep", "mask"),
        group=GUARDS,
        sdft_only=True,
        before_the_option="keep",
    )
    sft_weight: float = _opt(
        SFT_WEIGHT,
        "Add this x the SFT cross-entropy on the demonstration (0: pure SDFT).",
        group=GUARDS,
        sdft_only=True,
        before_the_option=0.0,
    )
    base_kl_weight: float = _opt(
        0.0,
        "Add this x KL(base||student) per token on the student's samples (0: none).",
        group=GUARDS,
        sdft_only=True,
    )
    max_degenerate_rise: float | None = _opt(
        None,
        "Stop when a report's degenerate rate exceeds the first report's by "
        "more than this; the last good report's adapters are kept. Default: never.",
        group=GUARDS,
        sdft_only=True,
    )

    # Reporting and saving.
    steps_per_report: int = _opt(
        10, "Optimizer steps between report lines.", group=REPORTING, resume_may_change=True
    )
    log_completions: int = _opt(
        2,
        "Every report, write this many sampled completions (prompt, completion, truncated, "
        "loss) to completions.jsonl in --adapter-path and show one (SDFT; 0: none).",
        group=REPORTING,
        resume_may_change=True,
        sdft_only=True,
    )
    log_text: bool = _opt(
        True,
        "Print text from the data: the first example's prompt and SFT-target panels, the "
        "sampled completion under each report line, warnings that quote a demonstration "
        "(--no-log-text: ids and numbers only, as serve --learn-every's background learns print).",
        group=REPORTING,
        resume_may_change=True,
    )
    steps_per_eval: int = _opt(
        200,
        "Optimizer steps between validations (teacher-student divergence).",
        group=REPORTING,
        resume_may_change=True,
    )
    val_batches: int = _opt(
        25,
        "Validation batches; -1 for the whole valid split.",
        group=REPORTING,
        resume_may_change=True,
    )
    max_bad_steps: int = _opt(
        3,
        "Stop after this many non-finite steps in a row (each is skipped).",
        group=REPORTING,
        resume_may_change=True,
    )
    save_every: int = _opt(
        100, "Optimizer steps between checkpoints.", group=REPORTING, resume_may_change=True
    )
    report_to: str | None = _opt(
        None, "Also log to this service.", ("wandb",), group=REPORTING, resume_may_change=True
    )
    project_name: str | None = _opt(
        None, "Project name for --report-to.", group=REPORTING, resume_may_change=True
    )
    dry_run: bool = _opt(
        False,
        "Check the input and print the memory estimate; load no weights.",
        resume_may_change=True,
    )

    def validate(self) -> Config:
        """Raise InputError naming the flag for any bad value; return self for chaining."""

        def bad(name: str, why: str):
            raise InputError(f"--{name.replace('_', '-')}: {why}")

        _check_groups(self)
        _positive(
            self,
            (
                "batch_size",
                "grad_accumulation_steps",
                "num_generations",
                "max_completion_length",
                "max_bad_steps",
                "steps_per_report",
                "steps_per_eval",
                "save_every",
                "learning_rate",
            ),
        )
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
        _completion_budget(self)
        for name in ("sft_weight", "base_kl_weight"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.base_kl_weight and self.logits_chunk:
            bad(
                "base_kl_weight",
                "does not combine with --logits-chunk yet (use --topk to save memory)",
            )
        if self.max_degenerate_rise is not None and not 0 <= self.max_degenerate_rise < 1:
            bad("max_degenerate_rise", f"must be in [0, 1), got {self.max_degenerate_rise}")
        if self.log_completions < 0:
            bad("log_completions", f"must be >= 0, got {self.log_completions}")
        if self.skip_first_tokens < 0:
            bad("skip_first_tokens", f"must be >= 0, got {self.skip_first_tokens}")
        _folder(self, "adapter_path")
        if self.resume and self.overwrite:
            bad(
                "overwrite",
                "cannot be combined with --resume (one continues the saved run, the other deletes it)",
            )
        if self.method == "sdft" and self.max_completion_length <= self.skip_first_tokens:
            bad(
                "max_completion_length",
                f"{self.max_completion_length} <= --skip-first-tokens {self.skip_first_tokens}: "
                "every sampled token would be left out of the loss and nothing would train",
            )
        if not (0 <= self.warmup_ratio < 1):
            bad("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            bad("weight_decay" if self.weight_decay < 0 else "grad_clip", "must be >= 0")
        if self.num_layers == 0 or self.num_layers < -1:
            bad("num_layers", f"must be -1 (all) or > 0, got {self.num_layers}")
        lora, default = self.lora_parameters, _LORA_DEFAULTS
        if not isinstance(lora, dict) or set(lora) - {*default, "keys"}:
            raise InputError(
                f"lora_parameters: takes rank, scale, dropout and keys (mlx-lm's), got "
                f"{sorted(lora) if isinstance(lora, dict) else lora!r}"
            )
        self.lora_parameters = {**default, **lora}  # {rank: 16} keeps mlx-lm's scale and dropout
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sft_ignores(cfg: Config) -> list[str]:
    """A --method sft run's SDFT_ONLY options that were given (flag, YAML or stages file: `cfg.given`,
    which load_config sets; a Config built otherwise counts every option as given) at a value other
    than the default, sorted; [] for SDFT. Not an error: one YAML file may serve both methods."""
    if cfg.method != "sft":
        return []
    given = SDFT_ONLY & getattr(cfg, "given", SDFT_ONLY)
    return sorted(
        name for name in given if getattr(cfg, name) != Config.__dataclass_fields__[name].default
    )


def _marked(key: str) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata.get(key))


# Read from the options' own declarations (`_opt`'s resume_may_change, sdft_only, before_the_option),
# so that a new option is one declaration.
RESUME_MAY_CHANGE = _marked("resume_may_change")
SDFT_ONLY = _marked("sdft_only")
BEFORE_THE_OPTION = {
    f.name: f.metadata["before_the_option"]
    for f in dataclasses.fields(Config)
    if "before_the_option" in f.metadata
}
