"""The SDFT training loop: sample → teacher scores → student scores → loss → update → EMA →
report → save. `train()` is the whole algorithm; the helpers above it are small and pure. It
writes nothing itself: it reports, saves and asks whether to stop through the `TrainingCallback`
it is given (as mlx-lm's `train` takes `training_callback`)."""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_sdft.errors import Interrupted, TrainingError
from mlx_sdft.core import guards
from mlx_sdft.core.degeneration import degeneration_sums
from mlx_sdft.core.objective import (
    PARTS,
    Objective,
    ObjectiveArgs,
    loss_parts,
    scored_rows,
    sdft_objective,
    supervised_loss,
    term_counts,
)
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.rollout import sample
from mlx_sdft.core.samples import records, sampled_rows
from mlx_sdft.core.teacher import (
    Leaves,
    checkpointing,
    evaluating,
    init_teacher,
    step_teacher,
    trainable_leaves,
    using,
)


@dataclass(frozen=True)
class TrainingArgs:
    """What the loop reads of a run's options, named and defaulted as the options themselves
    (config/train.py): its length, the optimizer, sampling, the teacher, reporting and saving;
    `objective` what the loss reads, `budget` what bounds a sample. `of` builds it from train's
    Config, as mlx-lm's lora.py builds its TrainingArgs."""

    iters: int | None
    epochs: float
    batch_size: int
    grad_accumulation_steps: int
    learning_rate: float
    optimizer: str
    weight_decay: float
    warmup_ratio: float
    grad_clip: float
    seed: int
    teacher: str
    teacher_update_rate: float
    top_p: float
    fuse_sampling: bool
    resume: bool
    max_bad_steps: int
    max_degenerate_rise: float | None
    steps_per_report: int
    log_completions: int
    steps_per_eval: int
    val_batches: int
    save_every: int
    adapter_path: str  # named in the --max-degenerate-rise stop's line; `callback` writes there
    objective: ObjectiveArgs
    budget: guards.Budget

    @classmethod
    def of(cls, options) -> TrainingArgs:
        """The options' fields of these names (train's Config, or a command's that extends it)."""
        parts = {"objective": ObjectiveArgs.of(options), "budget": guards.Budget.of(options)}
        return cls(
            **{
                f.name: parts[f.name] if f.name in parts else getattr(options, f.name)
                for f in fields(cls)
            }
        )


class PhaseTimer:
    """Wall-clock seconds per phase (sample / teacher / student), summed until reset."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - tic


class TrainingCallback:
    """Everything `train` tells or asks the world, as mlx-lm's `TrainingCallback`: it prints,
    reports, saves and learns of a Ctrl-C only through this. This one shows and writes nothing
    and never stops early (a run held in memory); `jobs/train.RunFolder` shows the progress,
    writes the run folder and answers Ctrl-C. Every process of a data-parallel run calls it;
    the callback decides which one writes."""

    def print(self, message: str) -> None:
        """A line for the person watching: resuming, a skipped step, an early stop."""

    def on_step(self, step: int, loss: float) -> None:
        """After every optimizer step, with that step's loss."""

    def on_report(self, record: dict, completions: list[dict] = ()) -> None:
        """A record of metrics.jsonl: "train" (every --steps-per-report, with the completions
        --log-completions logs), "eval" (a validation) or "stop" (--max-degenerate-rise)."""

    def save(
        self,
        step: int,
        student: Leaves,
        teacher: Leaves | None,
        optimizer: optim.Optimizer,
        state: dict,
        numbered: bool,
    ) -> None:
        """The run's whole state at `step`: the adapters, the teacher's leaves (None: no separate
        teacher), the optimizer and `state` (the data cursor); `numbered`: also keep a numbered
        copy of the adapters (a checkpoint)."""

    def resume(self, optimizer: optim.Optimizer, model: nn.Module) -> tuple[dict, Leaves | None]:
        """--resume: the saved adapters into `model` and the optimizer's state into `optimizer` →
        (the saved state, the saved teacher's leaves or None)."""
        raise TrainingError("--resume: this run has no saved state to resume from")

    def stop_requested(self) -> bool:
        """Asked once after every step: save now and stop (Ctrl-C)."""
        return False


def total_steps(args: TrainingArgs, num_examples: int) -> int:
    if args.iters is not None:
        return args.iters
    prompts_per_step = args.batch_size * args.grad_accumulation_steps
    return max(1, math.ceil(args.epochs * num_examples / prompts_per_step))


def batch_at(cursor: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices for the batch starting at `cursor` in the endless stream of shuffled
    epochs (epoch e is permutation (seed, e)). Stateless, so a cursor is all a resume needs."""
    orders: dict[int, np.ndarray] = {}  # one permutation per epoch the batch touches
    out = []
    for pos in range(cursor, cursor + batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(orders[epoch][i]))
    return out


def build_optimizer(args: TrainingArgs, steps: int) -> optim.Optimizer:
    """Linear warmup to the peak rate, then cosine decay to 0 (the paper's schedule)."""
    warmup = int(args.warmup_ratio * steps)
    cosine = optim.cosine_decay(args.learning_rate, max(steps - warmup, 1))
    lr = (
        optim.join_schedules(
            [optim.linear_schedule(0.0, args.learning_rate, warmup), cosine], [warmup]
        )
        if warmup
        else cosine
    )
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=args.weight_decay)


TRAIN_STREAM, VALID_STREAM = 0, 1


def sequence_seed(seed: int, position: int, generation: int, stream: int = TRAIN_STREAM) -> int:
    """The sampling seed of one completion: fixed by its place in the data stream, so a resumed
    or data-parallel run draws exactly the completions a single uninterrupted run draws."""
    return int(np.random.SeedSequence([seed, stream, position, generation]).generate_state(1)[0])


def rollout_batch(
    model: nn.Module,
    pairs: list[PromptPair],
    args: TrainingArgs,
    stop_ids: list[int],
    positions: list[int] | None = None,
    stream: int = TRAIN_STREAM,
):
    """Each prompt repeated --num-generations times, sampled from the current student weights.
    `positions` (the prompts' places in the data stream) seed each completion; without them
    sampling draws from MLX's global random state."""
    seeds = (
        None
        if positions is None
        else [
            sequence_seed(args.seed, p, g, stream)
            for p in positions
            for g in range(args.objective.num_generations)
        ]
    )
    pairs = [p for p in pairs for _ in range(args.objective.num_generations)]
    rollout = sample(
        model,
        [p.student_ids for p in pairs],
        [guards.completion_budget(p, args.budget) for p in pairs],
        stop_ids,
        temperature=args.objective.temperature,
        top_p=args.top_p,
        batch_size=len(pairs),
        seeds=seeds,
        fuse=args.fuse_sampling,
    )
    return pairs, rollout


def sdft_step(
    model,
    teacher: Leaves | None,
    pairs: list[PromptPair],
    positions: list[int],
    *,
    grad: bool,
    timer: PhaseTimer,
    stream: int = TRAIN_STREAM,
    args: TrainingArgs,
    stop_ids: list[int],
    objective: Objective,
    base: Leaves | None = None,
    log: int = 0,
    shares: dict[str, float] | None = None,
) -> tuple:
    """One SDFT micro-batch: sample from the student, the teacher's scores (no gradient), the
    student's loss and, with `grad`, its gradient (else None) → (loss, ntoks, grads, stats).
    stats["parts"] holds the loss's terms (Objective.student_loss); with `log`, stats["completions"]
    the first `log` completions with their own loss (--log-completions, samples.py), from the same
    passes. `shares`: each term's share of the optimizer step (`term_counts`), which `loss` and the
    gradient carry. Only the completions with a loss token (and those logged) are scored by the
    teacher, the base model and the student's divergence pass (`scored_rows`).
    The teacher and the base model score in eval mode (no dropout); the student's pass runs in the
    mode the model is in (train() sets train mode, validation eval mode)."""
    with timer("sample"):
        pairs, rollout = rollout_batch(model, pairs, args, stop_ids, positions, stream)
    truncated = guards.maskable(rollout.truncated, [p.demonstrated for p in pairs])
    # A completion without a loss token adds 0 to every term's sum: no pass scores it (unless logged).
    rows = scored_rows(rollout.completions, truncated, args.objective, log)
    scored = [pairs[i] for i in rows], [rollout.completions[i] for i in rows]
    with timer("teacher"), using(model, teacher), evaluating(model):
        scores = objective.teacher_scores(model, *scored) if rows else None
        mx.eval(scores)
    with (
        timer("teacher"),
        evaluating(model),
    ):  # what the guards need: truncation flags, the base model's logits
        with_base = args.objective.base_kl_weight and rows
        guard = guards.Guard(
            truncated, guards.base_logits(model, base, *scored) if with_base else None, rows
        )
        mx.eval(guard.base_logits)
    with timer("student"), checkpointing(model, grad and args.objective.grad_checkpoint):
        loss_and_grad = _value_and_grad(model, objective.student_loss, grad)
        (loss, ntoks, parts, own_N), grads = loss_and_grad(
            model, pairs, rollout.completions, scores, guard, shares, log
        )
        mx.eval(loss, ntoks, parts, own_N, grads or [])
    masked = args.objective.truncated == "mask"
    logged = (
        {"completions": sampled_rows(pairs, rollout, own_N.tolist(), masked=masked)} if log else {}
    )
    return (
        loss,
        ntoks,
        grads,
        {
            "n": len(pairs),
            "sampled": rollout.num_tokens,
            "length": rollout.num_tokens,
            "parts": parts,
            "truncated": sum(rollout.truncated),
            **logged,
            **degeneration_sums(
                rollout.completions, rollout.truncated, [p.demo_ids for p in pairs], stop_ids
            ),
        },
    )


def sft_step(
    model,
    teacher: Leaves | None,
    pairs: list[PromptPair],
    positions: list[int],
    *,
    grad: bool,
    timer: PhaseTimer,
    stream: int = TRAIN_STREAM,
    args: TrainingArgs,
    log: int = 0,
    shares: dict[str, float] | None = None,
) -> tuple:
    """One --method sft micro-batch: cross-entropy on the demonstrations and, with `grad`, its
    gradient → (loss, ntoks, grads, stats), as `sdft_step` (nothing sampled, no teacher, so
    nothing for `log`; `shares` as there)."""
    with timer("student"), checkpointing(model, grad and args.objective.grad_checkpoint):
        loss_and_grad = _value_and_grad(model, supervised_loss, grad)
        (loss, ntoks), grads = loss_and_grad(model, pairs, args.objective, shares)
        mx.eval(loss, ntoks, grads or [])
    return loss, ntoks, grads, {"n": len(pairs), "length": int(ntoks.item())}


def _value_and_grad(model, loss, grad: bool):
    """nn.value_and_grad(model, loss), or the same call shape without the gradient (None)."""
    return nn.value_and_grad(model, loss) if grad else lambda *args: (loss(*args), None)


def make_step(args: TrainingArgs, stop_ids: list[int], base: Leaves | None = None):
    """The micro-batch step of --method, its objective chosen once: `step(model, teacher, pairs,
    positions, grad=, timer=[, stream=, log=, shares=])` → (loss, ntoks, grads, stats). `base`
    (adapters off) is what --base-kl-weight compares with."""
    if args.objective.method == "sft":
        return partial(sft_step, args=args)
    return partial(
        sdft_step, args=args, stop_ids=stop_ids, objective=sdft_objective(args.objective), base=base
    )


def validation_loss(
    model, teacher, pairs: list[PromptPair], args: TrainingArgs, micro_step, group=None
) -> dict:
    """The training `micro_step` without its gradient on the validation prompts, with the same sampling
    seeds at every validation (differences between steps come from the weights): SDFT's
    teacher–student divergence on fresh samples (with the guards' terms; each part as val_PART), SFT's
    cross-entropy. Every pass runs in eval mode (no dropout), the model's mode restored after.
    With a distributed `group`, each rank scores every W-th batch and the sums are
    shared: the same numbers, 1/W of the work each."""
    world, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    batches = math.ceil(len(pairs) / args.batch_size)
    n = batches if args.val_batches < 0 else min(args.val_batches, batches)
    names = list(
        loss_parts(args.objective)
    )  # the same on every rank, which may have no batch to name them
    totals = [0.0] * (
        4 + len(names)
    )  # loss sum, length sum, batches, sequences, then each part's sum
    for b in range(rank, max(n, 1), world):
        start = b * args.batch_size
        batch = pairs[start : start + args.batch_size]
        positions = list(range(start, start + len(batch)))
        with evaluating(model):
            loss, _, _, stats = micro_step(
                model,
                teacher,
                batch,
                positions,
                grad=False,
                timer=PhaseTimer(),
                stream=VALID_STREAM,
            )
        values = [
            loss.item(),
            stats["length"],
            1,
            stats["n"],
            *(stats["parts"][k].item() for k in names),
        ]
        totals = [t + v for t, v in zip(totals, values)]
    if world > 1:
        totals = mx.distributed.all_sum(mx.array(totals, dtype=mx.float32), group=group).tolist()
    return {
        "val_loss": totals[0] / totals[2],
        "val_completion_len": totals[1] / totals[3],
        **{f"val_{k}": t / totals[2] for k, t in zip(names, totals[4:])},
    }


def train(
    model: nn.Module,
    tokenizer,
    train_pairs: list[PromptPair],
    valid_pairs: list[PromptPair],
    args: TrainingArgs,
    base: Leaves,
    callback: TrainingCallback | None = None,
    group=None,
) -> dict:
    """Run SDFT (or SFT); returns the last report record. Progress, records, saves and the
    question whether to stop go through `callback` (None: nothing is shown or written).

    With an mx.distributed `group` of W processes, each samples and scores every W-th prompt
    of a micro-batch and gradients are summed, so all ranks hold the same adapters and
    teacher; every rank calls `callback`, which writes from one (jobs/train: rank 0). Each
    micro-batch's loss terms are weighted by their share of the step (`term_counts`), so k
    micro-batches on W processes train as one batch k·W times larger, for every objective.
    """
    callback = callback or TrainingCallback()
    world, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    steps = total_steps(args, len(train_pairs))
    stop_ids = sorted(tokenizer.eos_token_ids)
    optimizer = build_optimizer(args, steps)
    teacher_kind = (
        args.teacher if args.objective.method == "sdft" else "live"
    )  # SFT has no teacher: None leaves
    teacher = init_teacher(teacher_kind, model, base)
    first, cursor, loss_tokens = 1, 0, 0
    if args.resume:
        state, saved_teacher = callback.resume(optimizer, model)
        first, cursor = state["step"] + 1, state["cursor"]
        loss_tokens = state.get(
            "loss_tokens", 1
        )  # runs saved before this count existed had trained
        teacher = saved_teacher if teacher_kind == "ema" else teacher
        callback.print(f"resuming after step {state['step']} (epoch {state['epoch']:.2f})")
    micro_step = make_step(args, stop_ids, base)  # SDFT or SFT, and the objective: chosen once
    bad_steps, window, record = 0, [], {}
    watch = (
        guards.DegenerateWatch(args.max_degenerate_rise)
        if args.max_degenerate_rise is not None
        else None
    )
    model.train()

    for step in range(first, steps + 1):
        timer, grads, stats, logged = PhaseTimer(), None, {}, []
        report = step % args.steps_per_report == 0 or step == steps
        batches = [
            batch_at(cursor + m * args.batch_size, len(train_pairs), args.batch_size, args.seed)
            for m in range(args.grad_accumulation_steps)
        ]
        # What each loss term of the step is a mean over, on every process: a micro-batch's term
        # weighs its count over this total (times W, which average_gradients divides out again).
        totals = Counter()
        for batch in batches:
            totals.update(term_counts([train_pairs[i] for i in batch], args.objective))
        for micro_index, batch in enumerate(batches):
            log = args.log_completions if report and rank == 0 and micro_index == 0 else 0
            positions = list(range(cursor, cursor + args.batch_size))[rank::world]
            cursor += args.batch_size
            pairs = [train_pairs[i] for i in batch[rank::world]]
            counts = term_counts(pairs, args.objective)
            shares = {k: n * world / totals[k] if totals[k] else 0.0 for k, n in counts.items()}
            loss, ntoks, g, micro = micro_step(
                model, teacher, pairs, positions, grad=True, timer=timer, log=log, shares=shares
            )
            logged += micro.pop("completions", [])
            parts = {
                k: v * shares[k] for k, v in micro.pop("parts", {}).items()
            }  # the loss's terms (SDFT), as weighted
            if world > 1:  # the shares carry W: the mean over processes is the sum of their shares
                g = nn.average_gradients(g, group=group)
                loss, ntoks = (
                    mx.distributed.all_sum(loss, group=group) / world,
                    mx.distributed.all_sum(ntoks, group=group),
                )
                parts = {
                    k: mx.distributed.all_sum(v, group=group) / world for k, v in parts.items()
                }
            grads = g if grads is None else tree_map(mx.add, grads, g)
            micro = {
                **micro,
                "loss": loss.item(),
                "ntoks": int(ntoks.item()),
                **{k: v.item() for k, v in parts.items()},
                "empty_batches": int(ntoks.item() == 0),
            }  # all within --skip-first-tokens, or masked
            loss_tokens += micro["ntoks"]
            for key, value in micro.items():
                stats[key] = stats.get(key, 0) + value

        with timer("student"):  # the micro-batches' shares sum to 1: `grads` is the step's gradient
            grads, grad_norm = (
                optim.clip_grad_norm(grads, args.grad_clip)
                if args.grad_clip
                else (grads, mx.array(0.0))
            )
            if not (math.isfinite(stats["loss"]) and math.isfinite(grad_norm.item())):
                bad_steps += 1  # skip the update: one NaN would poison the adapters and the teacher
                callback.print(
                    f"[yellow]step {step}: non-finite loss or gradient, update skipped[/]"
                )
                if bad_steps >= args.max_bad_steps:
                    raise TrainingError(
                        f"step {step}: {bad_steps} non-finite steps in a row; lower --learning-rate"
                    )
            else:
                bad_steps = 0
                optimizer.update(model, grads)
                mx.eval(model.parameters(), optimizer.state)
        teacher = step_teacher(teacher_kind, teacher, model, args.teacher_update_rate)

        window.append({**stats, **timer.seconds, "grad_norm": grad_norm.item()})
        callback.on_step(step, stats["loss"])
        if report:
            record = _summarize(window, step, optimizer)
            callback.on_report(record, records(tokenizer, step, logged))
            window = []
            state = {"cursor": cursor, "epoch": cursor / len(train_pairs), "total_steps": steps}
            if watch is not None and "degenerate" in record:
                rate = (
                    record["degenerate"]
                    if world == 1
                    # every rank decides on the same number
                    else (
                        mx.distributed.all_sum(mx.array(record["degenerate"]), group=group).item()
                        / world
                    )
                )
                if not watch.ok(rate):
                    return guards.stop_early(
                        callback, args.adapter_path, good, model, optimizer, watch, step, rate
                    )
                good = guards.snapshot(step, model, teacher, optimizer, state)
        if valid_pairs and (step % args.steps_per_eval == 0 or step == steps):
            with timer("eval"):
                val = validation_loss(model, teacher, valid_pairs, args, micro_step, group)
            callback.on_report(
                {"type": "eval", "step": step, **val, "val_s": timer.seconds["eval"]}
            )
        interrupted = callback.stop_requested()
        if step == steps and loss_tokens == 0:
            raise TrainingError(
                f"no micro-batch of the {steps} steps had a token in the loss (every completion ended "
                f"within --skip-first-tokens {args.objective.skip_first_tokens}, or was masked by "
                f"--truncated mask): nothing trained, nothing saved"
            )
        # Nothing is saved before a token reached the loss: those adapters are the untrained start.
        if loss_tokens and (step % args.save_every == 0 or step == steps or interrupted):
            state = {
                "cursor": cursor,
                "epoch": cursor / len(train_pairs),
                "total_steps": steps,
                "loss_tokens": loss_tokens,
            }
            callback.save(
                step,
                trainable_leaves(model),
                teacher,
                optimizer,
                state,
                numbered=step % args.save_every == 0,
            )
        if interrupted:
            raise Interrupted(step, saved=loss_tokens > 0)
    return record


def _summarize(window: list[dict], step: int, optimizer: optim.Optimizer) -> dict:
    """One report line: per-step means over the window, rates over its summed times."""
    k = len(window)
    total = lambda key: sum(w.get(key, 0.0) for w in window)  # noqa: E731
    busy = total("sample") + total("teacher") + total("student")
    return {
        "type": "train",
        "step": step,
        "loss": total("loss") / k,
        **{
            part: total(part) / k for part in PARTS if part in window[0]
        },  # loss = Σ weight × part (loss_parts)
        "learning_rate": float(optimizer.learning_rate.item()),
        "grad_norm": total("grad_norm") / k,
        "sample_s": total("sample") / k,
        "teacher_s": total("teacher") / k,
        "student_s": total("student") / k,
        "sampled_tps": total("sampled") / max(total("sample"), 1e-9),
        "trained_tps": total("ntoks") / max(busy, 1e-9),
        "completion_len": total("length") / max(total("n"), 1),
        "truncated": total("truncated") / max(total("n"), 1),
        **(
            {
                "degenerate": total("degenerate") / max(total("n"), 1),
                "len_ratio": total("len_ratio") / max(total("n"), 1),
            }
            if "degenerate" in window[0]
            else {}
        ),
        "empty_batches": int(total("empty_batches")),
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
