"""What the user sees while training: a rich progress bar, one line per report, and the same
numbers as JSON lines in metrics.jsonl (and optionally Weights & Biases)."""

from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlx_sdft.formats.checkpoint import COMPLETIONS, append_metrics
from mlx_sdft.errors import InputError


WIDTH = 100  # columns of every line this package prints when stderr is not a terminal (a log file)


def make_console() -> Console:
    """Rich's stderr console; piped to a file it is 100 columns wide (rich's default is 80)."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else WIDTH)


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
            self.reporter.print("[yellow]Ctrl-C: saving after this step (press again to stop at once)[/]")


def report_line(record: dict, total: int, sft: bool = False) -> str:
    """One report as one line of at most WIDTH columns. The loss is the mean over the steps since the
    last report (the progress bar shows the last step's). SFT samples nothing and has no teacher, so
    its line has no sampling fields. Where a line would be wider than WIDTH, the least needed fields
    (peak memory, then the learning rate) are left out; every number is in metrics.jsonl, with the
    sample/teacher/student seconds and the token rates."""
    r = record
    if r["type"] == "eval":
        return f"step {r['step']}/{total}  val loss {r['val_loss']:.4f}  val len {r['val_completion_len']:.1f}  ({r['val_s']:.1f}s)"
    busy = r["sample_s"] + r["teacher_s"] + r["student_s"]
    secs = f"{busy:.2f}" if busy < 10 else f"{busy:.1f}" if busy < 100 else f"{busy:.0f}"
    fields = [f"step {r['step']}/{total}", f"mean loss {r['loss']:.4f}", f"lr {r['learning_rate']:.1e}",
              f"len {r['completion_len']:.1f}"]
    if sft:
        fields += [f"{secs} s/step", f"{r['trained_tps']:.0f} tok/s"]
    else:
        if "degenerate" in r:  # sampled completions only
            fields[-1] += f" ({r['len_ratio']:.2f}x demo)"
        fields += [f"trunc {r['truncated']:.0%}"]
        fields += [f"degen {r['degenerate']:.0%}"] if "degenerate" in r else []
        fields += [f"{secs} s/step"]
    fields += [f"{r['empty_batches']} empty"] if r.get("empty_batches") else []  # micro-batches without loss tokens
    fields += [f"{r['peak_memory_gb']:.1f} GB"]
    for optional in (fields[-1], fields[2]):
        if len("  ".join(fields)) > WIDTH:
            fields.remove(optional)
    return "  ".join(fields)


class Reporter:
    def __init__(self, out: Path, total: int, console: Console | None = None, report_to: str | None = None,
                 project_name: str | None = None, config: dict | None = None, quiet: bool = False,
                 estimated_peak_gb: float | None = None, writer: bool = True, label: str = "SDFT"):
        # Only one process of a data-parallel run (rank 0) writes metrics and prints.
        self.out, self.total, self.quiet, self.writer = out, total, quiet or not writer, writer
        self.estimated_peak_gb, self.sft = estimated_peak_gb, label == "SFT"
        self.console = console or make_console()
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=quiet,
        )
        self.task = self.progress.add_task("train", total=total, loss="")
        self.wandb = None
        if report_to == "wandb" and writer:
            try:
                import wandb
            except ImportError:
                raise InputError("--report-to wandb: the wandb package is not installed (pip install wandb)") from None
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
        if not self.writer:
            return
        if record["type"] == "train" and self.estimated_peak_gb is not None:
            record = {**record, "estimated_peak_gb": self.estimated_peak_gb}  # to check the preflight
        append_metrics(self.out, record)
        self.print(report_line(record, self.total, self.sft), highlight=False, soft_wrap=True)
        if self.wandb is not None:
            self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k != "type"}, step=record["step"])

    def log_completions(self, rows: list[dict]):
        """Append the logged completions to completions.jsonl and show the first on one line."""
        if not self.writer or not rows:
            return
        for row in rows:
            append_metrics(self.out, row, COMPLETIONS)
        first = rows[0]
        trained = "masked (--truncated mask)" if first.get("masked") else f"loss {first['loss']:.4f}"
        head = (f"  sample {first['where'].rsplit('/', 1)[-1]}: {first['tokens']} tokens{', truncated' if first['truncated'] else ''}, "
                f"{trained}: ")
        self.print(head + clip(first["completion"], WIDTH - len(head)), highlight=False, markup=False, soft_wrap=True)


def clip(text: str, width: int) -> str:
    """`text` as one JSON-escaped line of at most `width` columns (… where cut)."""
    shown = json.dumps(text, ensure_ascii=False)
    return shown if len(shown) <= width else shown[: max(width - 1, 0)] + "…"
