"""What a new user of SDFT's defaults (issue 14) could not see, issues 13/14 follow-ups: which
objective a run trains, the loss's parts, check's completion budget, check's --output file, the
options --method sft ignores, and how --resume names an option turned off."""

import io
import json
import re

import pytest
from rich.console import Console

from mlx_sdft.config import PAPER_SDFT, load_config


def _dry_run(tiny_model, smoke_data, tmp_path, **kw) -> str:
    from mlx_sdft.jobs.train import run_train

    buf = io.StringIO()
    opts = dict(model=str(tiny_model), data=str(smoke_data), adapter_path=str(tmp_path / "d"), iters=1, num_layers=-1,
                dry_run=True)
    run_train(load_config(None, {**opts, **kw}), console=Console(file=buf, width=200))
    return buf.getvalue()


# ---- 1. the startup panel names the objective ------------------------------------------------


@pytest.mark.parametrize("options, want", [
    ({}, "objective forward KL + 0.5 x SFT, budget 2x demo, truncated masked, skip 0"),
    (PAPER_SDFT, "objective forward KL, no budget (--max-completion-length 1024), truncated kept, skip 3: "
                 "the paper's (PAPER_SDFT)"),
    ({"divergence": "jsd", "sft_weight": 0.25, "base_kl_weight": 0.1, "completion_budget": 1.5},
     "objective JSD (beta 0.5) + 0.25 x SFT + 0.1 x base KL (--base-kl-weight), budget 1.5x demo, "
     "truncated masked, skip 0"),
])
def test_startup_panel_names_the_objective(tiny_model, smoke_data, tmp_path, options, want):
    shown = _dry_run(tiny_model, smoke_data, tmp_path, **options)
    [line] = [line.strip("│ ") for line in shown.splitlines() if "objective " in line]
    assert line == want


def test_sft_panel_has_no_objective_line(tiny_model, smoke_data, tmp_path):
    assert "objective " not in _dry_run(tiny_model, smoke_data, tmp_path, method="sft")
