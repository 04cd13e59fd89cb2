"""Everything `mlx-sdft train` does around the loop: check all input, estimate memory, load,
resume, train, and stop cleanly on Ctrl-C. The loop (core.train) writes through `RunFolder`:
the report lines, metrics.jsonl and completions.jsonl, and the transactional save.

Data, options, prompts and the memory estimate are checked before any weights load, and
nothing is written to the output folder until training has produced something to write, except
its lock (train.lock): one run at a time writes into a folder, from its first write to its end.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path

import mlx.core as mx
from rich.panel import Panel
from rich.text import Text

from mlx_sdft.machine import blas, memory
from mlx_sdft.config import RESUME_MAY_CHANGE, Config, sft_ignores
from mlx_sdft.formats import checkpoint
from mlx_sdft.core.data import load_dataset, need_demonstrations
from mlx_sdft.core.guards import Budget, completion_budget, completion_room, skipped_prefix_warning
from mlx_sdft.core.objective import ObjectiveArgs, describe, loss_parts
from mlx_sdft.errors import InputError
from mlx_sdft.formats.models import check_adapter_fit
from mlx_sdft.core.prompts import (
    apply_system_prompt,
    describe_stops,
    encode_examples,
    student_text,
    system_prompt_note,
    teacher_text,
)
from mlx_sdft.machine.report import Reporter, StopFlag
from mlx_sdft.opening import open_to_train, open_tokenizer_for
from mlx_sdft.core.scoring import head_splits
from mlx_sdft.core.teacher import Leaves
from mlx_sdft.core.train import TrainingArgs, TrainingCallback, total_steps, train


AUTO_CHUNK = (
    16  # positions per chunk when the preflight turns chunking on: ~1/4 the memory of T = 256
)


def preflight(
    cfg: Config, model_path: Path, train_pairs, valid_pairs
) -> tuple[Config, dict[str, float] | None]:
    """(the options the run will use, the memory estimate); an InputError when it cannot fit.
    When memory is short the copy first gives up the fused sampling copy, then scores in chunks;
    `cfg` itself is left as it is. The estimate is None for models it cannot read."""
    config = memory.model_config(model_path)
    if cfg.logits_chunk and cfg.method == "sdft" and not head_splits(config.get("model_type", "")):
        raise InputError(
            f"--logits-chunk: the LM head of a {config.get('model_type', 'unknown')!r} model cannot be "
            f"run apart from its body here; use --topk to save memory instead"
        )
    if (
        not {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}
        <= config.keys()
    ):
        return cfg, None
    pairs = train_pairs + valid_pairs
    # The longest completion the run scores: SDFT samples up to each example's budget (a few times its
    # demonstration by default, not --max-completion-length), SFT scores the demonstrations.
    bounds = Budget.of(cfg)
    longest = (
        max(completion_budget(p, bounds) for p in pairs)
        if cfg.method == "sdft"
        else max(len(p.demo_ids) for p in pairs)
    )
    lengths = (
        max(len(p.student_ids) for p in pairs),
        max(len(p.teacher_ids) for p in pairs),
        max(len(p.demo_ids) for p in pairs),
        longest,
    )
    parts = memory.estimate(config, model_path, cfg, *lengths)
    have, what = memory.available_gb()
    if parts["peak"] > have and parts["fused_copy"] > 0:
        cfg = dataclasses.replace(cfg, fuse_sampling=False)  # slower sampling beats failing
        parts = memory.estimate(config, model_path, cfg, *lengths)
    if (
        parts["peak"] > have
        and not cfg.logits_chunk
        and cfg.method == "sdft"
        and not cfg.base_kl_weight
        and head_splits(config["model_type"])
    ):
        cfg = dataclasses.replace(cfg, logits_chunk=AUTO_CHUNK)
        parts = memory.estimate(config, model_path, cfg, *lengths)
    if parts["peak"] > have:
        raise InputError(
            f"this run needs about {parts['peak']:.1f} GB but the {what} is {have:.1f} GB "
            f"({memory.describe(parts)}); lower it with {memory.LOWER_IT}"
        )
    return cfg, parts


def startup_text(
    cfg: Config,
    model_path: Path,
    n_train: int,
    n_valid: int,
    steps: int,
    system: str | None,
    stops: str | None = None,
) -> Text:
    """What this run is: the model, the data, the system prompt, the stop tokens, the steps, the
    method, SDFT's objective (its guards on or off) and what trains."""
    lines = [
        f"model     {cfg.model}",
        *([f"          {model_path}"] if str(model_path) != cfg.model else []),
        f"data      {cfg.data}",
        f"examples  {n_train} training prompts, {n_valid} validation prompts",
        *([f"system    {system}"] if system else []),
        *([f"stops     {stops}"] if stops else []),
        f"steps     {steps} of {cfg.batch_size * cfg.grad_accumulation_steps} prompts"
        + (" (--iters)" if cfg.iters is not None else f" ({cfg.epochs:g} epochs)"),
        f"method    {cfg.method}"
        + (
            f", {cfg.num_generations} generation(s) per prompt, divergence {cfg.divergence}, teacher {cfg.teacher}"
            + (f" (rate {cfg.teacher_update_rate})" if cfg.teacher == "ema" else "")
            if cfg.method == "sdft"
            else ""
        ),
        *(
            [f"objective {describe(ObjectiveArgs.of(cfg), Budget.of(cfg))}"]
            if cfg.method == "sdft"
            else []
        ),
    ]
    params = memory.parameter_summary(memory.model_config(model_path), cfg)
    lines.append(
        f"adapters  {cfg.fine_tune_type} on {cfg.num_layers if cfg.num_layers > 0 else 'all'} blocks, "
        f"written to {cfg.adapter_path}"
    )
    lines += [f"          {params}"] if params else []
    return Text("\n".join(lines))


def options_text(cfg: Config) -> Text:
    """Every option as it resolved (defaults < YAML < flags), one per line; templates shown escaped."""
    shown = {
        k: (repr(v) if isinstance(v, str) and "\n" in v else v) for k, v in cfg.to_dict().items()
    }
    return Text("\n".join(f"{k.replace('_', '-')}: {v}" for k, v in shown.items()))


def check_loss_room(cfg: Config, pairs) -> None:
    """SDFT: a prompt whose completion budget (what --max-seq-length leaves after its prompts, and
    --completion-budget's share of its demonstration) ends within --skip-first-tokens would never
    reach the loss; say so before any weights load."""
    if cfg.method != "sdft":
        return
    bounds = Budget.of(cfg)
    for pair in pairs:
        budget = completion_budget(pair, bounds)
        if budget > cfg.skip_first_tokens:
            continue
        room = completion_room(pair, cfg.max_seq_length)
        why = (
            f"--max-seq-length {cfg.max_seq_length} leaves {room} completion tokens after its prompts"
            if budget == room
            else f"--completion-budget {cfg.completion_budget} allows it {budget} completion tokens"
        )
        raise InputError(
            f"{pair.where}: {why}, all within --skip-first-tokens {cfg.skip_first_tokens}: none would "
            f"reach the loss"
        )


def check_folder(cfg: Config, out: Path, train_pairs=()) -> None:
    """A new run never mixes with an earlier one in the same folder, and --resume continues only
    the run that was saved: every option that defines the run must equal the saved one."""
    if cfg.resume:
        if not (out / "trainer_state.json").exists():
            raise InputError(f"--resume: {out} holds no saved run (no trainer_state.json)")
        changes = checkpoint.changed_options(out, cfg, RESUME_MAY_CHANGE)
        if changes:
            raise InputError(
                f"--resume: {out} was trained with other options: {'; '.join(changes)} (resume with the "
                f"saved ones, or start a new run with --overwrite or another --adapter-path)"
            )
        saved = json.loads((out / "trainer_state.json").read_text()).get("data")
        if saved is not None and saved != checkpoint.data_digest(train_pairs):
            raise InputError(
                f"--resume: the training data of {out} changed since it was saved ({cfg.data}: its "
                f"examples, or how they render); resume with the same data, or start a new run with "
                f"--overwrite or another --adapter-path"
            )
    elif checkpoint.run_files(out) and not cfg.overwrite:
        raise InputError(
            f"--adapter-path: {out} holds an earlier run; continue it with --resume, or pass --overwrite "
            f"to delete it and start again"
        )


class RunFolder(TrainingCallback):
    """core.train's writers for `mlx-sdft train`: the progress bar and report lines (`reporter`),
    the run folder in --adapter-path (formats/checkpoint.py: metrics.jsonl, completions.jsonl,
    the transactional save with the data's digest) and Ctrl-C (`stop`, a StopFlag). Only the
    writing process (rank 0 of a data-parallel run) writes files."""

    def __init__(
        self,
        cfg: Config,
        reporter: Reporter,
        digest: str,
        writer: bool = True,
        estimated_peak_gb: float | None = None,
        stop: StopFlag | None = None,
    ):
        self.cfg, self.out, self.reporter, self.digest = (
            cfg,
            Path(cfg.adapter_path),
            reporter,
            digest,
        )
        self.writer, self.estimated_peak_gb, self.stop = writer, estimated_peak_gb, stop

    def print(self, message: str) -> None:
        self.reporter.print(message)

    def on_step(self, step: int, loss: float) -> None:
        self.reporter.advance(step, loss)

    def on_report(self, record: dict, completions: list[dict] = ()) -> None:
        if record["type"] == "train" and self.estimated_peak_gb is not None:
            record = {
                **record,
                "estimated_peak_gb": self.estimated_peak_gb,
            }  # to check the preflight
        if self.writer:
            checkpoint.append_metrics(self.out, record)
            for row in completions:
                checkpoint.append_metrics(self.out, row, checkpoint.COMPLETIONS)
        if record["type"] != "stop":  # an early stop is said in words (`print`)
            self.reporter.log(record)
            self.reporter.log_completions(completions)

    def save(
        self,
        step: int,
        student: Leaves,
        teacher: Leaves | None,
        optimizer,
        state: dict,
        numbered: bool,
    ) -> None:
        if self.writer:
            checkpoint.save(
                self.out,
                self.cfg,
                step,
                student,
                teacher,
                optimizer,
                {**state, "data": self.digest},
                checkpoint=numbered,
            )

    def resume(self, optimizer, model) -> tuple[dict, Leaves | None]:
        state, teacher = checkpoint.load_state(self.out, optimizer, model, self.cfg)
        if self.writer:  # the resumed run writes the records after the saved step again
            checkpoint.truncate_metrics(self.out, state["step"])
            checkpoint.truncate_metrics(self.out, state["step"], checkpoint.COMPLETIONS)
        return state, teacher

    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested


def run_train(
    cfg: Config,
    console=None,
    quiet: bool = False,
    examples: dict | None = None,
    loaded: tuple | None = None,
) -> dict:
    """Train as configured; returns the last report record (or the estimate with --dry-run).
    `examples`: the splits ({"train": [Example, ...]}) to train on instead of reading --data
    (learn's lessons and rules; cfg.data then only names them). `loaded`: (model_path, tokenizer,
    model, base) a caller already opened with `open_to_train(cfg)` (learn measures, trains and gates
    one loaded model); the run then trains it in place instead of loading the weights again."""
    out, ignored = (
        Path(cfg.adapter_path),
        sft_ignores(cfg),
    )  # before the preflight makes a copy of cfg
    group = mx.distributed.init()  # a group of one unless started by mlx.launch
    world, rank = group.size(), group.rank()
    if cfg.batch_size % world:
        raise InputError(
            f"--batch-size: {cfg.batch_size} prompts cannot be split evenly over {world} processes"
        )
    given = examples or load_dataset(cfg.data)
    splits = {name: apply_system_prompt(split, cfg.system_prompt) for name, split in given.items()}
    if cfg.method == "sft":
        for examples in splits.values():
            need_demonstrations(examples, "--method sft")
    model_path, tokenizer = opened = loaded[:2] if loaded else open_tokenizer_for(cfg)
    train_pairs = encode_examples(
        tokenizer, splits["train"], cfg.teacher_template, cfg.max_seq_length
    )
    valid_pairs = encode_examples(
        tokenizer, splits.get("valid", []), cfg.teacher_template, cfg.max_seq_length
    )
    check_loss_room(cfg, train_pairs + valid_pairs)
    # The one process that writes (rank 0; a dry run writes nothing) holds the folder for the run's
    # whole life: a folder that exists before anything in it is read (a run writing there now is
    # named by its pid, not taken for an earlier run), a new one just before the first write (a run
    # the checks below refuse leaves no folder behind), and then it is checked again.
    writes, existed = rank == 0 and not cfg.dry_run, out.is_dir()
    with ExitStack() as hold:
        stale = hold.enter_context(checkpoint.locked(out)) if writes and existed else None
        check_folder(cfg, out, train_pairs)
        cfg, estimate = preflight(cfg, model_path, train_pairs, valid_pairs)
        for adapters in ([Path(cfg.resume_adapter_file)] if cfg.resume_adapter_file else []) + (
            [out / "adapters.safetensors"] if cfg.resume else []
        ):
            check_adapter_fit(
                model_path, adapters, cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters
            )
        if writes and not existed:
            stale = hold.enter_context(checkpoint.locked(out))
            check_folder(
                cfg, out, train_pairs
            )  # a run may have started, and ended, in it meanwhile

        args = TrainingArgs.of(cfg)  # what the loop reads, as the preflight left the options
        reporter = Reporter(
            total_steps(args, len(train_pairs)),
            console=console,
            report_to=cfg.report_to,
            project_name=cfg.project_name,
            config=cfg.to_dict(),
            quiet=quiet,
            writer=rank == 0,
            label=cfg.method.upper(),
            parts=loss_parts(args.objective),
            text=cfg.log_text,
        )
        if reporter.writer and not quiet:
            blas.warn(reporter.console)
        if stale:
            reporter.print(
                f"took over {out / checkpoint.LOCK} from pid {stale}, a run that did not finish (killed?)",
                style="yellow",
                highlight=False,
            )
        panel = startup_text(
            cfg,
            model_path,
            len(train_pairs),
            len(valid_pairs),
            reporter.total,
            system_prompt_note(tokenizer, cfg.system_prompt),
            describe_stops(tokenizer),
        )
        reporter.print(Panel(panel, title="mlx-sdft train", expand=False))
        if ignored:
            reporter.print(
                f"warning: --method sft ignores {', '.join('--' + n.replace('_', '-') for n in ignored)} "
                f"(SDFT options: they change nothing in an SFT run)",
                style="yellow",
                highlight=False,
            )
        if estimate:
            reporter.print(f"memory estimate: {memory.describe(estimate)}", highlight=False)
        if cfg.method == "sdft" and not cfg.fuse_sampling:
            reporter.print(
                "sampling with unfused adapters: slower, but no copy of the weights", style="yellow"
            )
        if cfg.method == "sdft" and cfg.logits_chunk:
            reporter.print(
                f"scoring {cfg.logits_chunk} completion positions at a time (--logits-chunk)",
                style="yellow",
            )
        if (
            cfg.method == "sdft"
            and cfg.log_text
            and (
                warning := skipped_prefix_warning(
                    [p.demo_ids for p in train_pairs], cfg.skip_first_tokens, tokenizer.decode
                )
            )
        ):
            reporter.print(f"warning: {warning}", style="yellow", highlight=False)
        first = splits["train"][0]
        if cfg.log_text:  # --no-log-text: ids and numbers only (serve's background learns write to HOME/learn.log)
            reporter.print(
                Panel(
                    Text(student_text(tokenizer, first)),
                    title=f"student prompt ({first.where})",
                    expand=False,
                )
            )
        if cfg.method == "sdft" and cfg.log_text:
            reporter.print(
                Panel(
                    Text(teacher_text(tokenizer, first, cfg.teacher_template)),
                    title="teacher prompt",
                    expand=False,
                )
            )
        target = next(
            (p for p in train_pairs if p.demonstrated), None
        )  # a feedback lesson has no SFT target
        if (
            (cfg.method == "sft" or cfg.sft_weight) and target is not None and cfg.log_text
        ):  # what the cross-entropy trains on
            reporter.print(
                Panel(
                    Text(tokenizer.decode(target.demo_ids)),
                    title=f"SFT target ({target.where})",
                    expand=False,
                )
            )
        if cfg.dry_run:
            reporter.print(Panel(options_text(cfg), title="resolved options", expand=False))
            return estimate or {}
        if (
            not valid_pairs and examples is None
        ):  # a caller's own examples (learn's lessons) have no such file
            reporter.print("no valid.jsonl: validation is skipped", style="yellow")
        if cfg.overwrite and checkpoint.run_files(out) and rank == 0:
            reporter.print(f"--overwrite: deleting the earlier run in {out}", style="yellow")
            checkpoint.clear_run(out)

        model, base = loaded[2:] if loaded else open_to_train(cfg, opened)[2:]
        run = RunFolder(
            cfg,
            reporter,
            checkpoint.data_digest(train_pairs),
            writer=rank == 0,
            estimated_peak_gb=estimate["peak"] if estimate else None,
        )
        if world > 1:
            reporter.print(
                f"data parallel over {world} processes: {cfg.batch_size // world} prompts each per micro-batch"
            )
            with reporter:  # Ctrl-C goes to mlx.launch, which stops every rank
                return train(model, tokenizer, train_pairs, valid_pairs, args, base, run, group)
        with reporter, StopFlag(reporter) as stop:
            run.stop = stop
            return train(model, tokenizer, train_pairs, valid_pairs, args, base, run)
