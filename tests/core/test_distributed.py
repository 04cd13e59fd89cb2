"""Data parallel over mx.distributed: 2 processes on this machine (ring backend over loopback)
end with identical adapters, equal (float32 rounding) to one process trained on the same batches."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.config import PAPER_SDFT, load_config
from mlx_sdft.jobs.train import run_train

HELPER = Path(__file__).parents[1] / "helpers" / "dp_train.py"


def _opts(tiny_model, smoke_data, out):
    # batch_size 2: the 4 validation prompts make 2 batches, one per rank. The paper's objective, as
    # recorded; today's defaults (the --sft-weight term) are test_two_ranks_weigh_the_sft_term_as_one_process's.
    return dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=2,
        iters=3,
        max_completion_length=10,
        learning_rate=0.5,
        optimizer="sgd",
        steps_per_report=1,
        steps_per_eval=100,
        save_every=100,
        seed=3,
        **PAPER_SDFT,
    )


@pytest.mark.skipif(
    shutil.which("mlx.launch") is None
    and not (Path(sys.executable).parent / "mlx.launch").exists(),
    reason="mlx.launch is part of the mlx package; missing means a broken install",
)
def test_two_ranks_match_each_other_and_one_process(tiny_model, smoke_data, tmp_path):
    single = tmp_path / "single" / "adapters"
    run_train(load_config(None, _opts(tiny_model, smoke_data, single)), quiet=True)

    dp = tmp_path / "dp" / "adapters"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in _opts(tiny_model, smoke_data, dp).items()]
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    result = subprocess.run(
        [launcher, "-n", "2", "--backend", "ring", sys.executable, str(HELPER), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "data parallel over 2 processes" in result.stdout + result.stderr

    ranks = [mx.load(str(dp.parent / f"rank{r}.safetensors")) for r in (0, 1)]
    saved = mx.load(str(dp / "adapters.safetensors"))
    reference = mx.load(str(single / "adapters.safetensors"))
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for k in reference:
        np.testing.assert_array_equal(np.array(ranks[0][k]), np.array(ranks[1][k]))
        np.testing.assert_array_equal(np.array(saved[k]), np.array(ranks[0][k]))
        # Not bitwise: the mean of two half-batch gradients sums in another order than one
        # full-batch mean. SGD keeps that float32 rounding visible as rounding; Adam would
        # magnify it on near-zero gradients (g / sqrt(v) is ±1 at any scale).
        # GPU reductions round differently again: on an H200 (MLX CUDA) this differed by 6.4e-6.
        atol = 1e-6 if mx.default_device() == mx.cpu else 1e-5
        np.testing.assert_allclose(
            np.array(ranks[0][k]), np.array(reference[k]), atol=atol, rtol=1e-5
        )
    # Only rank 0 wrote metrics: one record per step, no duplicates.
    records = [json.loads(line) for line in (dp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["type"] == "eval"] == [3]
    # Each rank validated half the batches; the shared sums give the single process's numbers.
    [val] = [r for r in records if r["type"] == "eval"]
    [single_val] = [
        json.loads(line)
        for line in (single / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["type"] == "eval"
    ]
    assert val["val_completion_len"] == single_val["val_completion_len"]
    assert val["val_loss"] == pytest.approx(single_val["val_loss"], rel=1e-4)


@pytest.mark.skipif(
    shutil.which("mlx.launch") is None
    and not (Path(sys.executable).parent / "mlx.launch").exists(),
    reason="mlx.launch is part of the mlx package; missing means a broken install",
)
def test_two_ranks_weigh_the_sft_term_as_one_process(tiny_model, tmp_path):
    """Today's defaults (the --sft-weight term, a token mean) on ragged demonstrations: each rank's
    terms weigh by its share of the step's tokens, so 2 ranks of 1 prompt train as 1 process of 2
    (each rank's own token mean, averaged, missed that by 55% of the update's size)."""
    from test_train import _ragged

    data = _ragged(tmp_path)
    opts = dict(
        model=str(tiny_model),
        data=str(data),
        num_layers=-1,
        batch_size=2,
        iters=2,
        max_completion_length=16,
        learning_rate=0.1,
        optimizer="sgd",
        grad_clip=0,
        steps_per_report=1,
        steps_per_eval=100,
        save_every=100,
        seed=3,
    )
    single = tmp_path / "single" / "adapters"
    run_train(load_config(None, {**opts, "adapter_path": str(single)}), quiet=True)
    dp = tmp_path / "dp" / "adapters"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**opts, "adapter_path": str(dp)}.items()]
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    result = subprocess.run(
        [launcher, "-n", "2", "--backend", "ring", sys.executable, str(HELPER), *args],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    saved, reference = (mx.load(str(folder / "adapters.safetensors")) for folder in (dp, single))
    update = max(np.abs(np.array(v)).max() for k, v in reference.items() if k.endswith("lora_b"))
    assert update > 0
    assert (
        max(np.abs(np.array(saved[k]) - np.array(reference[k])).max() for k in reference)
        <= 2e-5 * update
    )
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"
        ]
        for folder in (dp, single)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
