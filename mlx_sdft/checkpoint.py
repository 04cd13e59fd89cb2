"""The output folder: adapters in mlx-lm's format, checkpoints, teacher, optimizer and state.

```
adapter_config.json            mlx-lm schema + every resolved option + an "sdft" block
adapters.safetensors           student adapter only (mlx-lm refuses extra tensors)
0000100_adapters.safetensors   checkpoints every --save-every
teacher_adapters.safetensors   EMA teacher leaves
optimizer_state.safetensors    optimizer state, for resuming
trainer_state.json             step, data cursor, RNG state, versions
metrics.jsonl                  one JSON object per report / eval
```
Every file is written to a temporary name in the same folder and renamed into place, so a
crash never leaves a torn file.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_sdft import __version__
from mlx_sdft.config import Config
from mlx_sdft.teacher import Leaves


def versions() -> dict:
    return {"mlx_sdft": __version__, "mlx": version("mlx"), "mlx_lm": version("mlx-lm")}


def _atomic(path: Path, write) -> None:
    # The temporary name keeps the real suffix: mx.save_safetensors appends one otherwise.
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(tmp)
        with open(tmp, "rb+") as fid:
            os.fsync(fid.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def write_arrays(path: Path, arrays: dict[str, mx.array]) -> None:
    _atomic(path, lambda p: mx.save_safetensors(str(p), arrays))


def adapter_config(cfg: Config, step: int) -> dict:
    """What mlx-lm's load_adapters reads (fine_tune_type, num_layers, lora_parameters) plus the rest."""
    return {**cfg.to_dict(), "sdft": {"step": step, "teacher_file": "teacher_adapters.safetensors", **versions()}}


def save(
    out: Path,
    cfg: Config,
    step: int,
    student: Leaves,
    teacher: Leaves | None,
    optimizer: optim.Optimizer,
    state: dict,
    checkpoint: bool,
) -> None:
    """Write the whole run state at `step`; `checkpoint` also keeps a numbered copy of the adapters."""
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint:
        write_arrays(out / f"{step:07d}_adapters.safetensors", student)
    if teacher is not None:
        write_arrays(out / "teacher_adapters.safetensors", teacher)
    write_arrays(out / "optimizer_state.safetensors", dict(tree_flatten(optimizer.state)))
    write_json(out / "trainer_state.json", {**state, "step": step, "versions": versions()})
    write_json(out / "adapter_config.json", adapter_config(cfg, step))
    # Last: adapters.safetensors appearing means everything it goes with is in place.
    write_arrays(out / "adapters.safetensors", student)


def append_metrics(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as fid:
        fid.write(json.dumps(record) + "\n")
