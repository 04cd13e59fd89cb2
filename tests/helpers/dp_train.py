"""Run `mlx-sdft train` under mlx.launch and save every rank's final adapters (rankN.safetensors)
next to the output folder, so a test can compare the ranks with each other."""

import sys
from pathlib import Path

import mlx_sdft.jobs.train as launch  # first: on Linux it loads OpenBLAS before MLX, as the test process does
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_sdft.cli import app

train = launch.train


def train_and_keep(model, *args, **kwargs):
    record = train(model, *args, **kwargs)
    rank = mx.distributed.init().rank()
    out = Path(args[3].adapter_path)  # core.train.TrainingArgs
    mx.save_safetensors(
        str(out.parent / f"rank{rank}.safetensors"),
        dict(tree_flatten(model.trainable_parameters())),
    )
    return record


launch.train = train_and_keep
sys.exit(app(["train", *sys.argv[1:]]))
