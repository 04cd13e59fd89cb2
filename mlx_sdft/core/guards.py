"""Guards against a collapsing SDFT student (small models loop, inflate their answers, and learn
from truncated samples). Each is an option of `train`; the budget, the mask and the SFT term are
on by default since issue 14 (config/options.py), the base-KL term and the stop are off.

- `--completion-budget M`: sample at most max(`BUDGET_FLOOR`, ⌈M · demonstration tokens⌉)
  tokens per example (still capped by --max-completion-length), so a loop ends early and
  costs little;
- `--truncated mask`: a completion that hit its budget without a stop token gets no loss tokens;
- `--sft-weight λ` and `--base-kl-weight μ`: `regularized_loss` adds λ · the SFT cross-entropy
  on the demonstration and μ · KL(base‖student) on the student's own samples;
- `--max-degenerate-rise x`: `DegenerateWatch` stops the run when a report's degenerate rate
  exceeds the first report's by more than x, and the adapters of the last good report are kept.

`shared_prefix` is the check behind the --skip-first-tokens warning. The loss terms' float64
twins are `reference.keep_rows` and `reference.regularized_loss` (tests/core/test_guards.py).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

from mlx_sdft.config import BUDGET_FLOOR
from mlx_sdft.core.losses import sdft_loss
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core import prefix
from mlx_sdft.core.teacher import Leaves, copy_leaves, trainable_leaves, using

SHARED_PREFIX = (
    0.5  # warn when at least this fraction of demonstrations open with the same skipped tokens
)


def demonstration_budget(
    demo_tokens: int, multiple: float, cap: int, floor: int = BUDGET_FLOOR
) -> int:
    """min(cap, max(floor, ⌈multiple · demo_tokens⌉)): one example's completion budget in tokens."""
    return min(cap, max(floor, math.ceil(multiple * demo_tokens)))


def completion_room(pair: PromptPair, max_seq_length: int) -> int:
    """Tokens a completion may have so that both its student and its teacher context stay within max_seq_length."""
    return max_seq_length - max(len(pair.student_ids), len(pair.teacher_ids))


@dataclass(frozen=True)
class Budget:
    """What bounds a sampled completion, named and defaulted as the options (config/): --max-seq-length,
    --max-completion-length and --completion-budget."""

    max_seq_length: int
    max_completion_length: int
    completion_budget: float | None

    @classmethod
    def of(cls, options) -> Budget:
        """The options' fields of these names (train's Config, or check's CheckConfig: its samples are the
        ones training would draw)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})


def completion_budget(pair: PromptPair, budget: Budget) -> int:
    """Tokens a completion may have so that both contexts stay within --max-seq-length; with
    --completion-budget M also at most demonstration_budget (M × the demonstration, floored),
    where there is a demonstration (a feedback lesson has none to measure by)."""
    room = completion_room(pair, budget.max_seq_length)
    cap = budget.max_completion_length
    if budget.completion_budget and pair.demonstrated:
        cap = demonstration_budget(len(pair.demo_ids), budget.completion_budget, cap)
    return min(cap, room)


@dataclass
class Guard:
    """What the guards' loss terms need from one micro-batch besides the teacher's scores."""

    truncated: list[bool]  # per completion: hit its budget without a stop token (`maskable`)
    base_logits: (
        mx.array | None
    )  # [B, T, V] of the base model on the completions `rows`, with --base-kl-weight
    # The completions scored (objective.scored_rows), in order: the teacher's scores and base_logits are
    # of these rows alone; None: of every completion.
    rows: list[int] | None = None


def maskable(truncated: list[bool], demonstrated: list[bool]) -> list[bool]:
    """The completions --truncated mask acts on: truncated ones of examples with a demonstration. A
    lesson without one (feedback) is sampled up to --max-completion-length, which says nothing of
    its answer's length: its truncated completions stay in the loss."""
    return [t and d for t, d in zip(truncated, demonstrated, strict=True)]


def keep_rows(mask_BT: mx.array, truncated_B: list[bool], mode: str) -> mx.array:
    """`mode` "keep": the mask as it is; "mask": rows of truncated completions zeroed, so they add
    no loss tokens (a row with none contributes 0 to the mean over sequences, which still
    divides by every sequence: fewer usable rows mean a smaller step, as a shorter batch would)."""
    if mode == "keep":
        return mask_BT
    if mode != "mask":
        raise ValueError(f"unknown truncated mode {mode!r}; choose keep or mask")
    keep_B = mx.array([0.0 if t else 1.0 for t in truncated_B], dtype=mx.float32)
    return mask_BT * keep_B[:, None]


def base_kl_loss(
    student_logits_BTV: mx.array, base_logits_BTV: mx.array, mask_BT: mx.array
) -> mx.array:
    """Mean over sequences of each sequence's token-mean KL(base‖student) on the student's own
    completions, every completion token counted (no skipped prefix: the base model has no
    teacher-context artifacts). The direction of `eval`'s retention_kl; gradient p − q_base."""
    return sdft_loss(
        student_logits_BTV, base_logits_BTV, mask_BT, divergence="forward", skip=0, beta=0.5
    )[0]


def regularized_loss(
    sdft: mx.array,
    *,
    sft: mx.array | None = None,
    base_kl: mx.array | None = None,
    sft_weight: float = 0.0,
    base_kl_weight: float = 0.0,
) -> mx.array:
    """sdft + λ · sft + μ · base_kl, a term left out where its weight is 0."""
    total = sdft
    if sft_weight:
        total = total + sft_weight * sft
    if base_kl_weight:
        total = total + base_kl_weight * base_kl
    return total


def shared_prefix(demonstrations: list[list[int]], skip: int) -> tuple[float, list[int]]:
    """(fraction, prefix): the most common first `skip` tokens of the demonstrations that are
    longer than `skip`, and the fraction of those demonstrations that open with them. When most
    demonstrations share their opening (a format such as `{"answer":`), --skip-first-tokens
    hides exactly what SDFT should teach."""
    heads = [tuple(d[:skip]) for d in demonstrations if len(d) > skip]
    if skip <= 0 or not heads:
        return 0.0, []
    prefix, count = Counter(heads).most_common(1)[0]
    return count / len(heads), list(prefix)


def skipped_prefix_warning(demonstrations: list[list[int]], skip: int, decode) -> str | None:
    """A one-line warning when ≥ SHARED_PREFIX of the demonstrations open with the same `skip`
    tokens, which the loss leaves out; None otherwise."""
    fraction, prefix = shared_prefix(demonstrations, skip)
    longer = sum(len(d) > skip for d in demonstrations)
    count = round(fraction * longer)
    if fraction < SHARED_PREFIX or count < 2:  # one demonstration alike to itself is no pattern
        return None
    return (
        f"{fraction:.0%} of the demonstrations ({count} of the {longer} longer than {skip} tokens) open with "
        f"the same {skip} tokens {decode(prefix)!r}, which "
        f"--skip-first-tokens {skip} leaves out of the loss: SDFT will not teach that opening "
        f"(--skip-first-tokens 0 trains on it)"
    )


class DegenerateWatch:
    """`--max-degenerate-rise x`: the first report's degenerate rate is the start; a later report
    whose rate exceeds start + x trips the watch. A report's rate is over all completions of its
    --steps-per-report steps (widen the window to smooth it)."""

    def __init__(self, rise: float):
        self.rise, self.start = rise, None

    def ok(self, rate: float) -> bool:
        if self.start is None:
            self.start = rate
        return rate <= self.start + self.rise


@dataclass
class Snapshot:
    """Everything a save needs, copied at a good report."""

    step: int
    student: Leaves
    teacher: Leaves | None
    optimizer_state: dict
    state: dict


def snapshot(step: int, model, teacher: Leaves | None, optimizer, state: dict) -> Snapshot:
    opt_state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, optimizer.state)
    return Snapshot(
        step,
        copy_leaves(trainable_leaves(model)),
        None if teacher is None else copy_leaves(teacher),
        opt_state,
        dict(state),
    )


def keep_last_good(good: Snapshot, model, optimizer) -> None:
    """Put the snapshot back: the model holds its adapters again and the optimizer its state, as
    if the run had ended at `good.step`."""
    model.load_weights(list(good.student.items()), strict=False)
    optimizer.state = good.optimizer_state


def stop_early(
    callback, adapter_path: str, good: Snapshot, model, optimizer, watch, step: int, rate: float
) -> dict:
    """--max-degenerate-rise tripped: keep the last good report's state, saved again through
    `callback` (core.train.TrainingCallback) so the output folder (`adapter_path`) holds it whole, and say why."""
    keep_last_good(good, model, optimizer)
    callback.save(good.step, good.student, good.teacher, optimizer, good.state, numbered=False)
    record = {
        "type": "stop",
        "step": step,
        "kept_step": good.step,
        "degenerate": rate,
        "degenerate_start": watch.start,
    }
    callback.on_report(record)
    callback.print(
        f"[red]step {step}: {rate:.0%} of the sampled completions are degenerate, up from {watch.start:.0%} "
        f"at the first report (more than --max-degenerate-rise {watch.rise} above it): "
        f"stopped; {Path(adapter_path)} holds the adapters of step {good.step}[/]"
    )
    return record


def base_logits(model, base: Leaves, pairs, completions) -> mx.array:
    """The base model's (adapters off) logits on the student's completions after the student's
    prompt, without gradient: the other side of --base-kl-weight's KL(base‖student). Each prompt
    is run once for its --num-generations completions (`prefix`)."""
    with using(model, base):
        return mx.stop_gradient(
            prefix.grouped(model, [([p.student_ids for p in pairs], completions)])[0]
        )
