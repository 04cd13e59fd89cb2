"""What the user sees while training: a rich progress bar, one line per report, and the same
numbers as JSON lines in metrics.jsonl (and optionally Weights & Biases)."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mlx_sdft.formats.checkpoint import append_metrics
from mlx_sdft.errors import InputError


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


_TRAIN_LINE = (
    "step {step}/{total}  loss {loss:.4f}  lr {learning_rate:.2e}  "
    "sample {sample_s:.2f}s  teacher {teacher_s:.2f}s  student+update {student_s:.2f}s  "
    "{sampled_tps:.0f} sampled tok/s  {trained_tps:.0f} trained tok/s  "
    "len {completion_len:.1f}  truncated {truncated:.0%}  peak {peak_memory_gb:.2f} GB"
)
_DEGENERATE = "  degenerate {degenerate:.0%}  len/demo {len_ratio:.2f}"  # sampled completions only (not SFT)
_EVAL_LINE = "step {step}/{total}  val loss {val_loss:.4f}  val len {val_completion_len:.1f}  ({val_s:.1f}s)"


class Reporter:
    def __init__(self, out: Path, total: int, console: Console | None = None, report_to: str | None = None,
                 project_name: str | None = None, config: dict | None = None, quiet: bool = False,
                 estimated_peak_gb: float | None = None, writer: bool = True, label: str = "SDFT"):
        # Only one process of a data-parallel run (rank 0) writes metrics and prints.
        self.out, self.total, self.quiet, self.writer = out, total, quiet or not writer, writer
        self.estimated_peak_gb = estimated_peak_gb
        self.console = console or Console(stderr=True)
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
        self.progress.update(self.task, completed=step, loss=f"loss {loss:.4f}")

    def log(self, record: dict):
        if not self.writer:
            return
        if record["type"] == "train" and self.estimated_peak_gb is not None:
            record = {**record, "estimated_peak_gb": self.estimated_peak_gb}  # to check the preflight
        append_metrics(self.out, record)
        line = _TRAIN_LINE + (_DEGENERATE if "degenerate" in record else "") if record["type"] == "train" else _EVAL_LINE
        self.print(line.format(total=self.total, **record), highlight=False)
        if self.wandb is not None:
            self.wandb.log({f"{record['type']}/{k}": v for k, v in record.items() if k != "type"}, step=record["step"])
