"""What the user sees while training: a rich progress bar, one line per report (and optionally the
same numbers in Weights & Biases), and the Ctrl-C that asks the run to save and stop; while a
long measurement answers its prompts, a plain progress line now and then; counts in the lines a
command prints ("1 lesson", "3 lessons"). The run folder's
metrics.jsonl and completions.jsonl are the job's to write (jobs/train.RunFolder)."""

from __future__ import annotations

import json
import signal
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mlx_sdft.errors import InputError


WIDTH = 100  # columns of every line this package prints when stderr is not a terminal (a log file)


def make_console() -> Console:
    """Rich's stderr console; piped to a file it is 100 columns wide (rich's default is 80)."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else WIDTH)


class ProgressLines:
    """Answers done of those planned, with the time so far and an estimate of the rest: one line at
    most every `every` seconds (plain lines, so a log file shows them too), through `say`."""

    def __init__(self, say, what: str, total: int, every: float = 30.0):
        self.say, self.what, self.total, self.every = say, what, max(total, 1), every
        self.done, self.started = 0, time.time()
        self.shown = self.started

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.time()
        if now - self.shown >= self.every or self.done >= self.total:
            self.shown = now
            left = (now - self.started) / max(self.done, 1) * max(self.total - self.done, 0)
            self.say(
                f"{self.what}: {self.done}/{self.total} answers, {now - self.started:.0f} s, about {left:.0f} s left"
            )


class StopFlag:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one
    stops at once (Python's default)."""

    def __init__(self, reporter: "Reporter | None" = None):
        self.requested, self.reporter = False, reporter

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.reporter is not None:
            self.reporter.print(
                "[yellow]Ctrl-C: saving after this step (press again to stop at once)[/]"
            )


def loss_sum(record: dict, parts: dict[str, tuple[str, float]] | None, prefix: str = "") -> str:
    """ "(kl 0.21 + 0.5 x sft 3.22)": the loss's parts with their weights (`parts`: metrics.jsonl's
    name → (label, weight), core.objective.loss_parts) when more than one term is on; "" otherwise."""
    shown = [
        (label, w, record[prefix + k])
        for k, (label, w) in (parts or {}).items()
        if prefix + k in record
    ]
    if len(shown) < 2:
        return ""
    return (
        "("
        + " + ".join(("" if w == 1 else f"{w:g} x ") + f"{label} {v:.3g}" for label, w, v in shown)
        + ")"
    )


def report_line(
    record: dict, total: int, sft: bool = False, parts: dict[str, tuple[str, float]] | None = None
) -> str:
    """One report as one line of at most WIDTH columns. The loss is the mean over the steps since the
    last report (the progress bar shows the last step's); when a guard adds a term, `loss L (kl K + λ
    x sft S)`: the same mean and its parts (`loss_sum`). SFT samples nothing and has no teacher, so
    its line has no sampling fields. Where a line would be wider than WIDTH, the least needed fields
    are left out: the peak memory, the learning rate, the length's ratio to the demonstrations, then
    the loss's parts; every number is in metrics.jsonl, with the sample/teacher/student seconds and
    the token rates."""
    r = record
    if r["type"] == "eval":
        lines = [
            f"step {r['step']}/{total}  val loss {r['val_loss']:.4f}{split}  val len {r['val_completion_len']:.1f}  "
            f"({r['val_s']:.1f}s)"
            for split in (f" {loss_sum(r, parts, 'val_')}".rstrip(), "")
        ]
        return next(line for line in lines if len(line) <= WIDTH or line == lines[-1])
    busy = r["sample_s"] + r["teacher_s"] + r["student_s"]
    secs = f"{busy:.2f}" if busy < 10 else f"{busy:.1f}" if busy < 100 else f"{busy:.0f}"
    split = loss_sum(r, parts)
    ratio = (
        f" ({r['len_ratio']:.2f}x demo)" if "degenerate" in r else ""
    )  # sampled completions only

    def line(memory: bool, lr: bool, ratio: str, split: str) -> str:
        loss = f"loss {r['loss']:.3g} {split}" if split else f"mean loss {r['loss']:.4f}"
        fields = [
            f"step {r['step']}/{total}",
            loss,
            *([f"lr {r['learning_rate']:.1e}"] if lr else []),
            f"len {r['completion_len']:.1f}{ratio}",
        ]
        if sft:
            fields += [f"{secs} s/step", f"{r['trained_tps']:.0f} tok/s"]
        else:
            fields += [f"trunc {r['truncated']:.0%}"]
            fields += [f"degen {r['degenerate']:.0%}"] if "degenerate" in r else []
            fields += [f"{secs} s/step"]
        fields += (
            [f"{r['empty_batches']} empty"] if r.get("empty_batches") else []
        )  # micro-batches without loss tokens
        fields += [f"{r['peak_memory_gb']:.1f} GB"] if memory else []
        return "  ".join(fields)

    shorter = [
        (True, True, ratio, split),
        (False, True, ratio, split),
        (False, False, ratio, split),
        (False, False, "", split),
        (False, False, "", ""),
    ]
    return next(
        (text for text in map(lambda args: line(*args), shorter) if len(text) <= WIDTH),
        line(*shorter[-1]),
    )


def progress_bars(console) -> Progress:
    """Bars with counts ("task prompts 8/12"), elapsed and remaining time."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


class Reporter:
    def __init__(
        self,
        total: int,
        console: Console | None = None,
        report_to: str | None = None,
        project_name: str | None = None,
        config: dict | None = None,
        quiet: bool = False,
        writer: bool = True,
        label: str = "SDFT",
        parts: dict[str, tuple[str, float]] | None = None,
        text: bool = True,
    ):
        # Only one process of a data-parallel run (rank 0) prints and logs. `parts`: the
        # loss's terms, their labels and weights (core.objective.loss_parts), for the report line.
        # `text` False (--no-log-text): no sampled completion is shown, only ids and numbers.
        self.total, self.quiet, self.writer = total, quiet or not writer, writer
        self.text = text
        self.sft, self.parts = label == "SFT", parts
        self.console = console or make_console()
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
        )
        self.task = self.progress.add_task("train", total=total, loss="")
        self.wandb = None
        if report_to == "wandb" and writer:
            try:
                import wandb
            except ImportError:
                raise InputError(
                    "--report-to wandb: the wandb package is not installed (pip install wandb)"
                ) from None
            self.wandb = wandb.init(project=project_name or "mlx-sdft", config=config)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()

    def print(self, *args, **kwargs):
        if not self.quiet:
            self.progress.console.print(*args, **kwargs)

    def advance(self, step: int, loss: float):
        self.progress.update(self.task, completed=step, loss=f"last step loss {loss:.4f}")

    def log(self, record: dict):
        """A "train" or "eval" record of metrics.jsonl as its report line (and to wandb)."""
        if not self.writer:
            return
        self.print(
            report_line(record, self.total, self.sft, self.parts), highlight=False, soft_wrap=True
        )
        if self.wandb is not None:
            self.wandb.log(
                {f"{record['type']}/{k}": v for k, v in record.items() if k != "type"},
                step=record["step"],
            )

    def log_completions(self, rows: list[dict]):
        """Show the first of a report's logged completions (completions.jsonl's rows) on one line."""
        if not self.writer or not rows:
            return
        first = rows[0]
        trained = (
            "masked (--truncated mask)" if first.get("masked") else f"loss {first['loss']:.4f}"
        )
        head = (
            f"  sample {first['where'].rsplit('/', 1)[-1]}: {first['tokens']} tokens{', truncated' if first['truncated'] else ''}, "
            f"{trained}"
        )
        shown = head + (
            f": {clip(first['completion'], WIDTH - len(head) - 2)}" if self.text else ""
        )
        self.print(shown, highlight=False, markup=False, soft_wrap=True)


def clip(text: str, width: int) -> str:
    """`text` as one JSON-escaped line of at most `width` columns (… where cut)."""
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= width else shown[: max(width - 1, 0)] + "…"


def count_of(n: int, one: str, many: str | None = None) -> str:
    """n and the noun it counts, singular or plural: "1 lesson", "3 lessons", "2 rules and facts"."""
    return f"{n} {one if n == 1 else many or one + 's'}"
