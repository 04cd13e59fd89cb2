"""The output folder: adapters in mlx-lm's format, checkpoints, teacher, optimizer and state.

```
adapter_config.json            mlx-lm schema + every resolved option + an "sdft" block
adapters.safetensors           student adapter only (mlx-lm refuses extra tensors)
0000100_adapters.safetensors   checkpoints every --save-every
teacher_adapters.safetensors   EMA teacher leaves
optimizer_state.safetensors    optimizer state, for --resume
trainer_state.json             step, data cursor, versions
metrics.jsonl                  one JSON object per report / eval
train.lock                     held (flock) by the run writing here, its pid inside (`locked`)
```
A save is one transaction: every file is first written under a `.pending-` name, then a
commit record lists them, then they are renamed into place. A crash before the commit leaves
the previous save untouched; a crash after it is rolled forward by `recover`. So the files in
the folder always belong to one step, and a full disk or a kill never costs the last good save.
Only one run writes into a folder at a time: it holds train.lock from before its first write to
its end.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlx_sdft import atomic, package_versions
from mlx_sdft.atomic import write_json
from mlx_sdft.config import BEFORE_THE_OPTION
from mlx_sdft.errors import InputError, TrainingError
from mlx_sdft.folder_lock import held

COMMIT = ".pending-commit.json"
LOCK = "train.lock"
METRICS, COMPLETIONS = "metrics.jsonl", "completions.jsonl"
STATE_FILES = (
    "adapters.safetensors",
    "teacher_adapters.safetensors",
    "optimizer_state.safetensors",
    "trainer_state.json",
    "adapter_config.json",
)


@contextmanager
def locked(out: Path):
    """The one run writing into `out` (created if missing) holds out/train.lock for the life of the
    block (the same flock as `learn`'s, `folder_lock.held`). Yields the pid of a run that was killed
    while holding it, else None. While another live run holds it: InputError naming its pid, and
    nothing in the folder is touched."""

    def busy(pid: str) -> InputError:
        return InputError(
            f"--adapter-path: {out} is in use by a train run that is still running (pid {pid}); "
            "wait for it to end, or write to another --adapter-path"
        )

    out.mkdir(parents=True, exist_ok=True)
    with held(out / LOCK, busy) as stale:
        yield stale


def write_arrays(path: Path, arrays: dict[str, mx.array], step: int | None = None) -> None:
    metadata = {"step": str(step)} if step is not None else None
    atomic.write(path, lambda p: mx.save_safetensors(str(p), arrays, metadata=metadata))


def adapter_config(cfg, step: int) -> dict:
    """What mlx-lm's load_adapters reads (fine_tune_type, num_layers, lora_parameters) plus the rest."""
    return {
        **cfg.to_dict(),
        "sdft": {
            "step": step,
            "teacher_file": "teacher_adapters.safetensors",
            **package_versions(),
        },
    }


def recover(out: Path) -> None:
    """Finish a save that was committed but not fully renamed; drop one that never committed."""
    commit = out / COMMIT
    if commit.exists():
        for name in json.loads(commit.read_text())["files"]:
            pending = out / f".pending-{name}"
            if pending.exists():
                os.replace(pending, out / name)
        commit.unlink()
    for leftover in [*out.glob(".pending-*"), *out.glob(".tmp-*")]:
        if _RUN_FILE.fullmatch(leftover.name):
            leftover.unlink()


def save(
    out: Path,
    cfg,
    step: int,
    student: dict,
    teacher: dict | None,
    optimizer: optim.Optimizer,
    state: dict,
    checkpoint: bool,
) -> None:
    """Write the whole run state at `step` as one transaction; `checkpoint` also keeps a
    numbered copy of the adapters. Non-finite adapters are never written."""
    if not all(mx.isfinite(v).all().item() for v in student.values()):
        raise TrainingError(f"step {step}: the adapters hold NaN or inf; nothing was saved")
    out.mkdir(parents=True, exist_ok=True)
    recover(out)
    files = {
        "adapters.safetensors": lambda p: write_arrays(p, student, step),
        "optimizer_state.safetensors": lambda p: write_arrays(
            p, dict(tree_flatten(optimizer.state)), step
        ),
        "trainer_state.json": lambda p: write_json(
            p, {**state, "step": step, "versions": package_versions()}
        ),
        "adapter_config.json": lambda p: write_json(p, adapter_config(cfg, step)),
    }
    if teacher is not None:
        files["teacher_adapters.safetensors"] = lambda p: write_arrays(p, teacher, step)
    if checkpoint:
        files[f"{step:07d}_adapters.safetensors"] = lambda p: write_arrays(p, student, step)
    try:
        for name, write in files.items():
            write(out / f".pending-{name}")
        write_json(out / COMMIT, {"step": step, "files": list(files)})
    except OSError as e:
        recover(out)  # nothing committed: the previous save stays as it was
        raise TrainingError(
            f"step {step}: could not save to {out} ({e.strerror or e}); "
            "the previous checkpoint is intact"
        ) from None
    recover(out)


def load_state(out: Path, optimizer: optim.Optimizer, model, cfg) -> tuple[dict, dict | None]:
    """Restore a run saved by `save`: adapters into `model`, the optimizer's state; returns the
    trainer state and the teacher leaves (None if the run had no separate teacher)."""
    recover(out)
    state = json.loads((out / "trainer_state.json").read_text())
    from mlx_sdft.formats.models import fitting_adapters  # the same check as --resume-adapter-file

    weights = fitting_adapters(
        model, out / "adapters.safetensors", cfg.fine_tune_type, cfg.lora_parameters
    )
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(
        list(mx.load(str(out / "optimizer_state.safetensors")).items())
    )
    teacher_file = out / "teacher_adapters.safetensors"
    teacher = mx.load(str(teacher_file)) if teacher_file.exists() else None
    return state, teacher


# The names a run writes besides STATE_FILES: numbered checkpoints (mlx-lm's `{step:07d}_`), and
# unfinished saves. Only these, so --overwrite never deletes a file of the user's that happens to
# sit in the folder (a `best_adapters.safetensors` kept by hand, notes, data).
_RUN_FILE = re.compile(r"\d{7}_adapters\.safetensors|\.pending-.+|\.tmp-\d+-.+")


def run_files(out: Path) -> list[Path]:
    """The files a training run writes into its folder (the layout above, and unfinished saves)."""
    if not out.is_dir():
        return []
    names = set(STATE_FILES) | {METRICS, COMPLETIONS, COMMIT}
    return sorted(
        p for p in out.iterdir() if p.is_file() and (p.name in names or _RUN_FILE.fullmatch(p.name))
    )


def clear_run(out: Path) -> None:
    """--overwrite: delete the earlier run's files, so nothing of it mixes with the new one."""
    for path in run_files(out):
        path.unlink()


def changed_options(out: Path, cfg, may_change: frozenset) -> list[str]:
    """ "--name saved → now" for each option that defines the run and differs from the saved one
    (an option the save predates: as BEFORE_THE_OPTION says, else not compared)."""
    saved = {**BEFORE_THE_OPTION, **json.loads((out / "adapter_config.json").read_text())}
    changes = []
    for name, now in cfg.to_dict().items():
        if name in may_change or name not in saved or _same(saved[name], now):
            continue
        unset = (
            "default" if cfg.__dataclass_fields__[name].type == "bool | None" else "off"
        )  # what None means
        changes.append(
            f"--{name.replace('_', '-')} {' → '.join(_shown_pair(saved[name], now, unset))}"
        )
    return changes


def _shown_pair(saved, now, unset: str = "off", width: int = 40) -> tuple[str, str]:
    """Both values, short enough for one line yet showing where they differ: None as `unset` (off:
    `--completion-budget 0` is saved as null; an automatic default), paths and other one-line strings
    whole up to 120 characters; longer ones (templates) from a little before their first
    difference, `width` characters."""
    one_line = lambda v: "\n" not in v and len(v) <= 120  # noqa: E731
    if not (isinstance(saved, str) and isinstance(now, str)) or (one_line(saved) and one_line(now)):
        return tuple(unset if v is None else repr(v) for v in (saved, now))
    head = max(len(os.path.commonprefix([saved, now])) - 10, 0)
    cut = lambda v: (
        ("..." if head else "")
        + repr(v[head : head + width])[1:-1]
        + ("..." if len(v) > head + width else "")
    )  # noqa: E731
    return f"'{cut(saved)}'", f"'{cut(now)}'"


def _same(saved, now) -> bool:
    if saved == now:
        return True
    if (
        isinstance(saved, str)
        and isinstance(now, str)
        and Path(saved).exists()
        and Path(now).exists()
    ):
        return Path(saved).resolve() == Path(now).resolve()  # the same file given another way
    return False


def saved_step(path: Path) -> int | None:
    """The step recorded in a safetensors file's metadata."""
    _, metadata = mx.load(str(path), return_metadata=True)
    return int(metadata["step"]) if "step" in metadata else None


def data_digest(pairs) -> str:
    """The training data as the run sees it (each PromptPair's student, teacher and target ids, in
    order): saved with the run, so --resume refuses data or templates that changed since."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.student_ids, p.teacher_ids, p.demo_ids]).encode())
    return h.hexdigest()[:16]


def truncate_metrics(out: Path, step: int, name: str = METRICS) -> None:
    """Drop records past `step` from a JSON-lines file of the run: a resumed run writes them again."""
    path = out / name
    if path.exists():
        keep = [
            line
            for line in path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        atomic.write_text(path, "".join(line + "\n" for line in keep))


def append_metrics(out: Path, record: dict, name: str = METRICS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / name, "a", encoding="utf-8") as fid:
        fid.write(json.dumps(record) + "\n")
