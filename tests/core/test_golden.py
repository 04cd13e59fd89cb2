"""Numbers a refactor must not move: golden per-step losses of fixed tiny runs, and gradient
accumulation that is exactly a bigger batch (torchtune's two regression guards)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.config import PAPER_SDFT, load_config
from mlx_sdft.jobs.train import run_train

# Recorded from the code before the issue-19 refactor (tiny model of tests/tiny.py, seed 0).
# Plain SGD keeps float rounding as rounding (Adam would blow it up on near-zero gradients);
# rel 1e-4 leaves room for another BLAS's summation order, not for a changed formula.
# The SDFT cases pin the paper's objective (PAPER_SDFT, the defaults they were recorded with before
# the guards' defaults changed them); "sdft-defaults" is today's defaults (budget, mask, SFT term, no skip),
# recorded when they became the defaults.
GOLDEN = {
    "sdft": (
        PAPER_SDFT,
        [0.11901509761810303, 0.4604142904281616, 0.19315382838249207],
        0.07395129650831223,
    ),
    "sdft-topk-reverse": (
        {**PAPER_SDFT, "topk": 8, "divergence": "reverse"},
        [0.025208547711372375, 0.08142569661140442, 0.037742409855127335],
        0.01975175365805626,
    ),
    "sdft-chunk-jsd": (
        {**PAPER_SDFT, "logits_chunk": 4, "divergence": "jsd"},
        [0.029098156839609146, 0.10330735146999359, 0.046866968274116516],
        0.01876036636531353,
    ),
    "sdft-topk-chunk": (
        {**PAPER_SDFT, "topk": 8, "logits_chunk": 4},
        [0.02846587635576725, 0.12357867509126663, 0.04906352981925011],
        0.021755754947662354,
    ),
    # 32 tokens: the budget (2x the 9-15 demonstration tokens) binds; the tiny model seldom stops, so most
    # completions are masked, and step 3 holds one that stopped.
    "sdft-defaults": (
        {"max_completion_length": 32},
        [3.3387792110443115, 2.9577436447143555, 3.3367257118225098],
        3.3749804496765137,
    ),
    "sft": (
        {"method": "sft"},
        [6.677557468414307, 5.915487766265869, 5.903053283691406],
        5.997184753417969,
    ),
}


def _opts(tiny_model, smoke_data, out, **kw):
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=2,
        iters=3,
        max_completion_length=8,
        learning_rate=0.1,
        optimizer="sgd",
        warmup_ratio=0.0,
        steps_per_report=1,
        steps_per_eval=3,
        val_batches=1,
        save_every=100,
        seed=11,
    )
    return load_config(None, {**opts, **kw})


def _records(out, kind):
    return [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["type"] == kind
    ]


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_per_step_losses(tiny_model, smoke_data, tmp_path, name):
    options, losses, val_loss = GOLDEN[name]
    run_train(_opts(tiny_model, smoke_data, tmp_path / name, **options), quiet=True)
    assert [r["loss"] for r in _records(tmp_path / name, "train")] == pytest.approx(
        losses, rel=1e-4
    )
    assert [r["val_loss"] for r in _records(tmp_path / name, "eval")] == pytest.approx(
        [val_loss], rel=1e-4
    )


def test_gradient_accumulation_is_a_bigger_batch(tiny_model, smoke_data, tmp_path):
    """k micro-batches of b prompts update the adapters as one batch of k·b does: the SDFT loss
    is a mean of per-sequence means, and each completion's seed is its place in the data stream."""
    # No clipping: a clipped gradient would hide a wrong scale.
    # The paper's objective: the --sft-weight term is a token mean per micro-batch (as --method sft's).
    run_train(
        _opts(
            tiny_model,
            smoke_data,
            tmp_path / "kb",
            batch_size=2,
            grad_accumulation_steps=2,
            grad_clip=0,
            **PAPER_SDFT,
        ),
        quiet=True,
    )
    run_train(
        _opts(tiny_model, smoke_data, tmp_path / "one", batch_size=4, grad_clip=0, **PAPER_SDFT),
        quiet=True,
    )
    kb, one = (mx.load(str(tmp_path / name / "adapters.safetensors")) for name in ("kb", "one"))
    assert kb.keys() == one.keys()
    assert (
        max(np.abs(np.array(v)).max() for k, v in one.items() if k.endswith("lora_b")) > 1e-3
    )  # it trained
    for k in one:  # to float32 rounding: two half-batch means sum in another order than one mean
        np.testing.assert_allclose(np.array(kb[k]), np.array(one[k]), rtol=1e-5, atol=1e-6)
    losses = [[r["loss"] for r in _records(tmp_path / name, "train")] for name in ("kb", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_sft_ignores_the_sdft_options(tiny_model, smoke_data, tmp_path):
    """--method sft trains on the demonstrations alone: SDFT's defaults (--sft-weight 0.5, the budget,
    the mask, the skip) change nothing in it, and the paper's values (sft_weight 0) give the same run."""
    for name, options in (
        ("defaults", {}),
        ("paper", PAPER_SDFT),
        ("other", {"sft_weight": 2.0, "skip_first_tokens": 5}),
    ):
        run_train(
            _opts(tiny_model, smoke_data, tmp_path / name, method="sft", **options), quiet=True
        )
    losses = {
        name: [r["loss"] for r in _records(tmp_path / name, "train")]
        for name in ("defaults", "paper", "other")
    }
    assert (
        losses["defaults"]
        == losses["paper"]
        == losses["other"]
        == pytest.approx(GOLDEN["sft"][1], rel=1e-4)
    )
    adapters = [
        mx.load(str(tmp_path / name / "adapters.safetensors"))
        for name in ("defaults", "paper", "other")
    ]
    for k in adapters[0]:
        np.testing.assert_array_equal(np.array(adapters[0][k]), np.array(adapters[1][k]))
        np.testing.assert_array_equal(np.array(adapters[0][k]), np.array(adapters[2][k]))
