"""What a run says about its options: which
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
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(tmp_path / "d"),
        iters=1,
        num_layers=-1,
        dry_run=True,
    )
    run_train(load_config(None, {**opts, **kw}), console=Console(file=buf, width=200))
    return buf.getvalue()


# ---- 1. the startup panel names the objective ------------------------------------------------


@pytest.mark.parametrize(
    "options, want",
    [
        ({}, "objective forward KL + 0.5 x SFT, budget 2x demo, truncated masked, skip 0"),
        (
            PAPER_SDFT,
            "objective forward KL, no budget (--max-completion-length 1024), truncated kept, skip 3: "
            "the paper's (PAPER_SDFT)",
        ),
        (
            {
                "divergence": "jsd",
                "sft_weight": 0.25,
                "base_kl_weight": 0.1,
                "completion_budget": 1.5,
            },
            "objective JSD (beta 0.5) + 0.25 x SFT + 0.1 x base KL (--base-kl-weight), budget 1.5x demo, "
            "truncated masked, skip 0",
        ),
    ],
)
def test_startup_panel_names_the_objective(tiny_model, smoke_data, tmp_path, options, want):
    shown = _dry_run(tiny_model, smoke_data, tmp_path, **options)
    [line] = [line.strip("│ ") for line in shown.splitlines() if "objective " in line]
    assert line == want


def test_sft_panel_has_no_objective_line(tiny_model, smoke_data, tmp_path):
    assert "objective " not in _dry_run(tiny_model, smoke_data, tmp_path, method="sft")


# ---- 2. the loss's parts, per step in metrics.jsonl and on the report line -------------------


def _train(tiny_model, smoke_data, out, **kw) -> list[dict]:
    from mlx_sdft.jobs.train import run_train

    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=2,
        grad_accumulation_steps=2,
        iters=2,
        max_completion_length=12,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=2,
        val_batches=1,
        seed=3,
    )
    run_train(load_config(None, {**opts, **kw}), quiet=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_log_the_loss_parts(tiny_model, smoke_data, tmp_path):
    """loss = sdft_loss + λ sft_loss + μ base_kl, per report (one step each) and per validation; the SFT
    part is what --method sft computes on the same batch; pure SDFT logs its loss as sdft_loss alone."""
    # The tiny model never stops: --truncated keep, or every completion would be masked (sdft_loss 0).
    both = _train(
        tiny_model,
        smoke_data,
        tmp_path / "both",
        sft_weight=0.5,
        base_kl_weight=0.3,
        truncated="keep",
    )
    train = [r for r in both if r["type"] == "train"]
    assert len(train) == 2
    for r in train:
        # base_kl ≥ 0 to rounding: at step 1 it is the KL of equal distributions, the student's scored over the
        # prefill it shares with its demonstration (core/prefix.py), the base model's by a full pass.
        assert r["sdft_loss"] > 0 and r["sft_loss"] > 0 and r["base_kl"] >= -1e-6
        assert r["loss"] == pytest.approx(
            r["sdft_loss"] + 0.5 * r["sft_loss"] + 0.3 * r["base_kl"], rel=1e-5
        )
    assert train[0]["base_kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters are the base model
    assert train[1]["base_kl"] > 0  # after one update they are not
    [val] = [r for r in both if r["type"] == "eval"]
    assert val["val_loss"] == pytest.approx(
        val["val_sdft_loss"] + 0.5 * val["val_sft_loss"] + 0.3 * val["val_base_kl"], rel=1e-5
    )
    sft = [
        r
        for r in _train(tiny_model, smoke_data, tmp_path / "sft", method="sft")
        if r["type"] == "train"
    ]
    assert train[0]["sft_loss"] == pytest.approx(
        sft[0]["loss"], rel=1e-5
    )  # step 1: the same weights, the same batch
    assert not {"sdft_loss", "sft_loss", "base_kl"} & sft[0].keys()
    pure = [
        r
        for r in _train(tiny_model, smoke_data, tmp_path / "pure", **PAPER_SDFT)
        if r["type"] == "train"
    ]
    assert all(
        r["sdft_loss"] == pytest.approx(r["loss"], rel=1e-6)
        and not {"sft_loss", "base_kl"} & r.keys()
        for r in pure
    )


def _record(**kw):
    return {
        "type": "train",
        "step": 30,
        "loss": 1.8228,
        "learning_rate": 2.5e-6,
        "completion_len": 26.2,
        "len_ratio": 1.87,
        "truncated": 0.75,
        "degenerate": 0.75,
        "sample_s": 10.0,
        "teacher_s": 1.5,
        "student_s": 1.3,
        "trained_tps": 100.0,
        "empty_batches": 0,
        "peak_memory_gb": 1.2,
        "sdft_loss": 0.2104,
        "sft_loss": 3.2248,
        **kw,
    }


def test_report_line_shows_the_parts_when_a_guard_term_is_on():
    from mlx_sdft.machine.report import WIDTH, report_line

    defaults = {
        "sdft_loss": ("kl", 1.0),
        "sft_loss": ("sft", 0.5),
    }  # core.objective.loss_parts of the defaults
    line = report_line(_record(), 100, parts=defaults)
    assert (
        line
        == "step 30/100  loss 1.82 (kl 0.21 + 0.5 x sft 3.22)  len 26.2  trunc 75%  degen 75%  12.8 s/step"
    )
    assert len(line) <= WIDTH
    pure = report_line(
        _record(), 100, parts={"sdft_loss": ("kl", 1.0)}
    )  # one term: nothing to split
    assert "mean loss 1.8228  lr 2.5e-06  len 26.2 (1.87x demo)" in pure and "(kl" not in pure
    # Wider numbers: the parts stay while other fields go; at the very widest they go too (metrics.jsonl has them).
    wide = _record(step=300, completion_len=124.0, empty_batches=2, base_kl=0.0123)
    line = report_line(wide, 1000, parts={**defaults, "base_kl": ("base-kl", 0.05)})
    assert "(kl 0.21 + 0.5 x sft 3.22 + 0.05 x base-kl 0.0123)" not in line and len(line) <= WIDTH
    line = report_line(_record(step=300), 1000, parts=defaults)
    assert "  loss 1.82 (kl 0.21 + 0.5 x sft 3.22)  " in line and len(line) <= WIDTH
    val = report_line(
        {
            "type": "eval",
            "step": 30,
            "val_loss": 1.9,
            "val_completion_len": 11.0,
            "val_s": 3.0,
            "val_sdft_loss": 0.3,
            "val_sft_loss": 3.2,
        },
        100,
        parts=defaults,
    )
    assert val == "step 30/100  val loss 1.9000 (kl 0.3 + 0.5 x sft 3.2)  val len 11.0  (3.0s)"
    wide = {
        "type": "eval",
        "step": 3000,
        "val_loss": 1.9,
        "val_completion_len": 1011.0,
        "val_s": 3000.0,
        "val_sdft_loss": 0.3013,
        "val_sft_loss": 3.2123,
        "val_base_kl": 0.01234,
    }
    line = report_line(wide, 3000, parts={**defaults, "base_kl": ("base-kl", 0.05)})
    assert (
        line == "step 3000/3000  val loss 1.9000  val len 1011.0  (3000.0s)"
    )  # too wide with its parts


# ---- 3. check samples within the completion budget training would use -----------------------


@pytest.mark.parametrize(
    "options, budget",
    [
        (
            {},
            lambda demo: max(16, -(-2 * demo // 1)),
        ),  # the default: 2x the demonstration, at least 16 tokens
        (
            {"completion_budget": 2.0, "max_completion_length": 20},
            lambda demo: min(20, max(16, 2 * demo)),
        ),  # capped
        (
            {"completion_budget": 0, "max_completion_length": 24},
            lambda demo: 24,
        ),  # off: the cap alone
    ],
)
def test_check_samples_within_the_training_budget(tiny_model, smoke_data, options, budget):
    """The tiny model never stops, so every sample is as long as its budget allows: check's samples are
    as long as training's would be (not --max-tokens), and all of them hit the budget."""
    from mlx_sdft.config import CheckConfig
    from mlx_sdft.core.data import load_dataset
    from mlx_sdft.core.prompts import encode_examples
    from mlx_sdft.formats.models import open_tokenizer
    from mlx_sdft.jobs.check import run_check

    cfg = load_config(
        None,
        {
            "model": str(tiny_model),
            "data": str(smoke_data),
            "num_examples": 4,
            "num_samples": 4,
            "max_tokens": 6,
            **options,
        },
        CheckConfig,
    )
    report = run_check(cfg, console=Console(file=io.StringIO()))
    _, tokenizer = open_tokenizer(str(tiny_model))
    demos = [
        len(p.demo_ids)
        for p in encode_examples(
            tokenizer,
            load_dataset(smoke_data)["train"][:4],
            cfg.teacher_template,
            cfg.max_seq_length,
        )
    ]
    assert report["sample_len_ratio"] == pytest.approx(sum(budget(d) / d for d in demos) / 4)
    assert report["sample_truncated"] == 1.0  # all would be masked by --truncated mask


# ---- 4. check --output PATH.json writes that file ---------------------------------------------


def test_check_output_names_a_json_file_or_a_folder(tiny_model, smoke_data, tmp_path):
    from typer.testing import CliRunner

    from mlx_sdft.cli import app

    def check(output):
        args = [
            "check",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--num-examples",
            "2",
            "--num-samples",
            "2",
            "--max-tokens",
            "3",
            "--max-completion-length",
            "4",
            "--output",
            str(output),
        ]
        return CliRunner().invoke(app, args, env={"COLUMNS": "200"})

    result = check(tmp_path / "runs" / "mine.json")  # a file, its folder created
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / "mine.json").is_file() and json.loads(
        (tmp_path / "runs" / "mine.json").read_text()
    )["examples"] == 2
    assert f"wrote {tmp_path / 'runs' / 'mine.json'}" in result.stderr
    assert check(tmp_path / "runs" / "mine.json").exit_code == 0  # written again over itself
    assert (
        check(tmp_path / "out").exit_code == 0 and (tmp_path / "out" / "check.json").is_file()
    )  # a folder, as before
    (tmp_path / "folder.json").mkdir()  # an existing folder whose name ends in .json is a folder
    assert (
        check(tmp_path / "folder.json").exit_code == 0
        and (tmp_path / "folder.json" / "check.json").is_file()
    )
    (tmp_path / "notes.txt").write_text(
        "mine"
    )  # an existing file that is not .json: refused before any model loads
    result = check(tmp_path / "notes.txt")
    assert (
        result.exit_code == 2
        and "--output" in result.stderr
        and (tmp_path / "notes.txt").read_text() == "mine"
    )


# ---- 5. --method sft names the SDFT options it ignores ----------------------------------------


def _sdft_options_at_other_values(first: bool) -> dict:
    """Every SDFT_ONLY option at a value other than its default (--logits-chunk and --base-kl-weight,
    which do not combine, one in each half)."""
    values = dict(
        teacher="base",
        teacher_update_rate=0.5,
        divergence="jsd",
        beta=0.3,
        num_generations=2,
        fuse_sampling=False,
        max_completion_length=7,
        temperature=0.7,
        top_p=0.9,
        skip_first_tokens=2,
        topk=8,
        completion_budget=0.0,
        truncated="keep",
        sft_weight=0.0,
        max_degenerate_rise=0.1,
        log_completions=0,
        teacher_template="Q: {question}\nA: {demonstration}",
    )
    return {**values, **({"base_kl_weight": 0.2} if first else {"logits_chunk": 4})}


def test_sft_trains_the_same_whatever_the_sdft_only_options(tiny_model, smoke_data, tmp_path):
    """What the warning claims: --method sft trains exactly the same adapters with every SDFT_ONLY
    option at another value (and the list names every option this test moves)."""
    import mlx.core as mx
    import numpy as np

    from mlx_sdft.config import SDFT_ONLY

    assert (
        set(_sdft_options_at_other_values(True)) | set(_sdft_options_at_other_values(False))
        == SDFT_ONLY
    )
    runs = {
        "plain": {},
        "a": _sdft_options_at_other_values(True),
        "b": _sdft_options_at_other_values(False),
    }
    losses = {
        name: [
            r["loss"]
            for r in _train(tiny_model, smoke_data, tmp_path / name, method="sft", **options)
            if r["type"] == "train"
        ]
        for name, options in runs.items()
    }
    assert losses["plain"] == losses["a"] == losses["b"]
    adapters = {name: mx.load(str(tmp_path / name / "adapters.safetensors")) for name in runs}
    for k in adapters["plain"]:
        np.testing.assert_array_equal(np.array(adapters["plain"][k]), np.array(adapters["a"][k]))
        np.testing.assert_array_equal(np.array(adapters["plain"][k]), np.array(adapters["b"][k]))


def test_sft_warns_once_naming_the_sdft_options_given(tiny_model, smoke_data, tmp_path):
    from typer.testing import CliRunner

    from mlx_sdft.cli import app

    yaml = tmp_path / "shared.yaml"  # a file shared with SDFT runs: the default value says nothing
    yaml.write_text("skip_first_tokens: 3\nsft_weight: 0.5\ncompletion_budget: 0\n")

    def warnings(*args):
        result = CliRunner().invoke(
            app,
            [
                "train",
                "--model",
                str(tiny_model),
                "--data",
                str(smoke_data),
                "--dry-run",
                "--adapter-path",
                str(tmp_path / "a"),
                *args,
            ],
            env={"COLUMNS": "200"},
        )
        assert result.exit_code == 0, result.output
        text = " ".join(result.stderr.split())  # wrapped at 100 columns, as piped
        return re.findall(r"warning: --method sft ignores .*?\)", text)

    assert warnings(
        "--method", "sft", "--temperature", "0.7", "--teacher", "base", "-c", str(yaml)
    ) == [
        "warning: --method sft ignores --completion-budget, --skip-first-tokens, --teacher, --temperature (SDFT "
        "options: they change nothing in an SFT run)"
    ]
    assert (
        warnings("--method", "sft", "--sft-weight", "0.5") == []
    )  # the default: nothing ignored that matters
    assert (
        warnings("--method", "sft") == []
        and warnings("--temperature", "0.7", "-c", str(yaml)) == []
    )  # SDFT reads them


def test_sft_resumed_with_saved_options_is_not_warned(tmp_path, smoke_data, tiny_model):
    """--resume fills options nobody gave from the saved run (a run from before the guards' defaults: the paper's
    guards): not given, so not named."""
    from mlx_sdft.config import sft_ignores

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"method": "sft", "skip_first_tokens": 3})
    )
    given = {
        "model": str(tiny_model),
        "data": str(smoke_data),
        "adapter_path": str(tmp_path),
        "resume": True,
    }
    cfg = load_config(None, given)
    assert (cfg.method, cfg.skip_first_tokens, cfg.sft_weight, cfg.completion_budget) == (
        "sft",
        3,
        0.0,
        None,
    )
    assert sft_ignores(cfg) == []
    assert sft_ignores(load_config(None, {**given, "temperature": 0.5})) == ["temperature"]


# ---- 6. --resume names an option turned off as off ---------------------------------------------


def test_resume_differences_name_an_option_turned_off(tmp_path, smoke_data, tiny_model):
    """`--completion-budget 0` is off (saved as null): the difference reads `2.0 → off`, not `→ None`;
    an option whose None is its automatic default (--dequantize) reads `default`."""
    from mlx_sdft.config import RESUME_MAY_CHANGE
    from mlx_sdft.formats import checkpoint

    def changes(saved: dict, now: dict) -> list[str]:
        base = {"model": str(tiny_model), "data": str(smoke_data), "adapter_path": str(tmp_path)}
        config = checkpoint.adapter_config(load_config(None, {**base, **saved}), 1)
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        return checkpoint.changed_options(
            tmp_path, load_config(None, {**base, **now}), RESUME_MAY_CHANGE
        )

    assert changes({}, {"completion_budget": 0}) == ["--completion-budget 2.0 → off"]
    assert changes({"completion_budget": 0, "max_degenerate_rise": 0.2}, {"dequantize": True}) == [
        "--dequantize default → True",
        "--completion-budget off → 2.0",
        "--max-degenerate-rise 0.2 → off",
    ]
