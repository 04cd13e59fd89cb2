"""The eval, check and continual commands on the tiny model (their numbers: tests/measure/test_measure.py)."""

import importlib.util
import json

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT
from mlx_sdft.formats.checkpoint import save
from mlx_sdft.cli import app
from mlx_sdft.config import Config, load_config
from mlx_sdft.formats.models import Adapters, open_model
from mlx_sdft.core.teacher import trainable_leaves, using
from mlx_sdft.jobs.train import run_train
from mlx_sdft.core.train import TrainingArgs, build_optimizer

runner = CliRunner()


def _untrained_adapters(tiny_model, out):
    mx.random.seed(0)
    model, _ = open_model(tiny_model, adapters=Adapters("lora", -1, Config().lora_parameters))
    cfg = Config(model=str(tiny_model), data="-", num_layers=-1)
    save(
        out,
        cfg,
        0,
        trainable_leaves(model),
        None,
        build_optimizer(TrainingArgs.of(cfg), 1),
        {},
        checkpoint=False,
    )
    return out


def _trained_adapters(tiny_model, smoke_data, out, **kw):
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        iters=4,
        learning_rate=1e-2,
        max_completion_length=12,
        steps_per_eval=100,
        **kw,
    )
    run_train(load_config(None, opts), quiet=True)
    return out


def test_base_leaves_turn_the_adapters_off(tiny, tiny_model, smoke_data, tmp_path):
    plain, _ = tiny
    model, base = open_model(
        tiny_model, adapters=_trained_adapters(tiny_model, smoke_data, tmp_path / "a")
    )
    x = mx.array([[1, 300, 201, 293]])
    with using(model, base):
        np.testing.assert_allclose(np.array(model(x)), np.array(plain(x)), atol=1e-5)


def test_eval_cli_writes_predictions_and_summary(tiny_model, smoke_data, tmp_path):
    adapters = _trained_adapters(tiny_model, smoke_data, tmp_path / "a")
    prior = tmp_path / "prior.jsonl"
    prior.write_text(json.dumps({"text": "The capital of Chile is Santiago."}) + "\n")
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model),
            "--adapter-path",
            str(adapters),
            "--data",
            str(smoke_data),
            "--max-tokens",
            "8",
            "--num-general-prompts",
            "4",
            "--retention-max-tokens",
            "6",
            "--prior-text",
            str(prior),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((adapters / "eval" / "summary.json").read_text())
    assert summary["examples"] == 4 and 0.0 <= summary["task_score"] <= 1.0
    assert (
        summary["retention_kl"] > 0 and summary["prior_ppl"] > 1 and summary["prior_ppl_base"] > 1
    )
    general = [
        json.loads(line) for line in (adapters / "eval" / "general.jsonl").read_text().splitlines()
    ]
    assert (
        len(general) == 4
        and {"answer", "degenerate", "base_answer", "base_degenerate"} <= general[0].keys()
    )
    assert summary["degenerate_rate"] == sum(g["degenerate"] for g in general) / 4
    assert summary["degenerate_rate_base"] == sum(g["base_degenerate"] for g in general) / 4
    assert (
        summary["repetitive_rate"]
        == sum(g["repetitive"] for g in general) / 4
        <= summary["degenerate_rate"]
    )
    assert all(g["degenerate"] == (g["truncated"] or g["repetitive"]) for g in general)
    rows = [
        json.loads(line)
        for line in (adapters / "eval" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and rows[0]["reference"] == "The capital of Portugal is Lisbon."
    assert {"prediction", "score", "where"} <= rows[0].keys()


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--data", "/no/such/test.jsonl"], r"/no/such/test.jsonl: no such file"),
        (["--metric", "nowhere:fn"], r"--metric: cannot import 'nowhere:fn'"),
        (
            ["--metric", "regex", "--answer-regex", "(unclosed"],
            r"--answer-regex: '\(unclosed' does not compile",
        ),
    ],
)
def test_eval_bad_input_exits_2(tiny_model, smoke_data, args, pattern):
    import re

    result = runner.invoke(
        app, ["eval", "--model", str(tiny_model), "--data", str(smoke_data), *args]
    )
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and re.search(pattern, result.stderr), (
        result.stderr
    )


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_folder_without_adapters_is_one_line(
    tiny_model, smoke_data, tmp_path, command, monkeypatch
):
    """Every command opens adapters the same way: a folder that holds none is named before any weights load."""
    import mlx_sdft.formats.models as models

    monkeypatch.setattr(
        models,
        "load_model",
        lambda *a: pytest.fail("weights loaded before the adapters were checked"),
    )
    args = ["--data", str(smoke_data)] if command == "eval" else ["--prompt", "Hi"]
    result = runner.invoke(
        app, [command, "--model", str(tiny_model), "--adapter-path", str(tmp_path), *args]
    )
    assert result.exit_code == 2, result.output
    assert (
        result.stderr.strip()
        == f"mlx-sdft {command}: error: {tmp_path}: not an adapter folder (no adapter_config.json)"
    )


def test_check_reports_both_contexts(tiny_model, smoke_data, monkeypatch):
    from mlx_sdft.jobs import check
    from mlx_sdft.config import CheckConfig

    def run(**kw):
        return check.run_check(
            CheckConfig(
                model=str(tiny_model),
                data=str(smoke_data),
                num_examples=4,
                metric="normalized",
                max_tokens=6,
                **kw,
            ).validate()
        )

    report = run(skip_first_tokens=3)
    assert report["examples"] == 4
    assert report["student_loglik"] < 0 and report["teacher_loglik"] < 0
    assert report["student_loglik"] != report["teacher_loglik"]
    assert {"student_score", "teacher_score"} <= report.keys()
    assert report["verdict"].split(":")[0] in {"GOOD", "WEAK", "POOR"}
    assert report["samples"] == 4 and report["sample_kl"] > 0
    # The tiny model never stops: every sample hits its completion budget, so all are degenerate.
    assert (
        0 <= report["teacher_disagreement"] <= 1
        and report["sample_degenerate"] == report["sample_truncated"] == 1.0
    )
    assert report["recommendation"].startswith("recommend SFT")  # all samples degenerate
    assert (
        "open with the same 3 tokens" in report["warning"]
        and "of the student's samples open that way" in report["warning"]
    )
    # The tiny model (its config.json counts about 100K parameters) is far below SMALL_MODEL: flagged.
    from mlx_sdft.machine.memory import base_parameters, model_config

    size = base_parameters(model_config(tiny_model))
    assert report["small_model"].startswith(
        f"a small model ({size / 1e3:.0f}K parameters, below 1.5B)"
    )
    assert "both methods lost much of what the base model knew" in report["small_model"]
    # The default --skip-first-tokens (0) hides no opening; a model at or above the threshold gets no note.
    monkeypatch.setattr(check, "SMALL_MODEL", size)
    report = run()
    assert "warning" not in report and "small_model" not in report


def test_small_model_note():
    from mlx_sdft.jobs.check import SMALL_MODEL, small_model_note

    assert small_model_note(134_515_008).startswith("a small model (135M parameters, below 1.5B): ")
    assert small_model_note(1_235_814_400).startswith("a small model (1.2B parameters")
    assert small_model_note(int(SMALL_MODEL)) is None and small_model_note(None) is None


def test_small_model_note_quotes_the_recipe():
    """The note's numbers are recipes/retention-small's: the prior-task means of SDFT (the defaults) and
    SFT at their chosen rates and at the v1 rate, and the base model's, to 2 decimals. New results there
    must update the note."""
    from mlx_sdft.jobs.check import SMALL_MODEL_NOTE

    summary = json.loads((ROOT / "recipes/retention-small/results/summary.json").read_text())
    methods = summary["methods"]
    prior = {name: m["prior_task"]["mean"] for name, m in methods.items()}
    base = summary["base"]["prior_task"]
    ratio = methods["sdft_lr0.0001"]["lr"] / methods["sdft"]["lr"]
    assert methods["sft"]["lr"] == methods["sdft"]["lr"]
    quoted = (
        f"prior-task score {prior['sdft']:.2f} for SDFT vs {prior['sft']:.2f} for SFT (base {base:.2f}) at the "
        f"learning rate each chose on validation, and at {ratio:g}x that rate SDFT forgot more than SFT "
        f"({prior['sdft_lr0.0001']:.2f} vs {prior['sft_lr0.0001']:.2f})"
    )
    assert quoted in " ".join(SMALL_MODEL_NOTE.split())
    # the note's claims: both far below the base model; at the higher rate SDFT below SFT
    assert max(prior["sdft"], prior["sft"]) < base - 0.05
    assert prior["sdft_lr0.0001"] < prior["sft_lr0.0001"]


@pytest.mark.parametrize(
    "strength, degenerate, disagreement, want",
    [
        ("GOOD", 0.0, 0.1, "recommend pure SDFT (--sft-weight 0):"),
        (
            "GOOD",
            0.25,
            0.1,
            "recommend SDFT with the defaults (--sft-weight 0.5, --completion-budget 2, --truncated mask):",
        ),
        ("GOOD", 0.0, 0.6, "recommend SDFT with the defaults"),
        ("WEAK", 0.0, 0.1, "recommend SDFT with the defaults"),
        ("GOOD", 0.5, 0.1, "recommend SFT"),
        ("POOR", 0.0, 0.1, "recommend SFT"),
    ],
)
def test_recommendation(strength, degenerate, disagreement, want):
    from mlx_sdft.jobs.check import recommend

    report = {
        "verdict": f"{strength}: ...",
        "sample_degenerate": degenerate,
        "teacher_disagreement": disagreement,
        "sample_kl": 0.3,
    }
    assert recommend(report).startswith(want)


def _stages(tmp_path, tiny_model, **extra):
    stages = {
        "model": str(tiny_model),
        "output": str(tmp_path / "run"),
        "methods": ["sdft", "sft"],
        "iters": 2,
        "num_layers": -1,
        "learning_rate": 1e-3,
        "max_completion_length": 8,
        "steps_per_eval": 100,
        "eval": {"max_tokens": 6, "num_general_prompts": 4, "retention_max_tokens": 6},
        "stages": [
            {"name": "capitals", "data": str(ROOT / "recipes/smoke/data")},
            {
                "name": "opposites",
                "data": str(ROOT / "recipes/continual/opposites"),
                "learning_rate": 5e-4,
            },
        ],
        **extra,
    }
    path = tmp_path / "stages.yaml"
    path.write_text(json.dumps(stages))  # JSON is YAML
    return path


def test_continual_two_stages_complete_matrix_and_resume(tiny_model, tmp_path):
    from mlx_sdft.jobs.continual import run_continual

    path = _stages(tmp_path, tiny_model)
    results = run_continual(str(path))
    for method in ("sdft", "sft"):
        r = results[method]
        assert r["stages"] == ["base", "capitals", "opposites"]
        assert (
            r["scores"][0][0] is not None
            and r["scores"][0][1] is not None
            and r["scores"][0][2] is not None
        )
        assert (
            r["scores"][1][1] is None and r["scores"][1][2] is not None
        )  # not evaluated before it is trained
        assert r["retention_kl"][0] == 0.0 and r["retention_kl"][2] > 0
        assert len(r["degenerate_rate"]) == 3 and all(0 <= d <= 1 for d in r["degenerate_rate"])
    out = tmp_path / "run"
    assert json.loads((out / "retention.json").read_text()) == results
    if importlib.util.find_spec("matplotlib"):  # the optional plot extra draws them
        assert (out / "retention_matrix.png").stat().st_size > 0 and (
            out / "learning_curves.png"
        ).exists()
    # Every evaluation's greedy answers are kept: the base model's on every task, each stage's on the tasks so far.
    assert sorted(p.name for p in (out / "base/predictions").iterdir()) == [
        "capitals.jsonl",
        "opposites.jsonl",
    ]
    assert sorted(p.name for p in (out / "sft/01-capitals/predictions").iterdir()) == [
        "capitals.jsonl"
    ]
    rows = [
        json.loads(line)
        for line in (out / "sdft/02-opposites/predictions/opposites.jsonl").read_text().splitlines()
    ]
    assert len(rows) == len(
        (ROOT / "recipes/continual/opposites/test.jsonl").read_text().splitlines()
    )
    assert {"prompt", "prediction", "reference", "score"} <= rows[0].keys()
    config = json.loads((out / "sdft/02-opposites/adapter_config.json").read_text())
    assert config["resume_adapter_file"].endswith("01-capitals/adapters.safetensors")
    assert config["learning_rate"] == 5e-4
    # A rerun finds every stage done and trains nothing.
    stamp = (out / "sft/02-opposites/adapters.safetensors").stat().st_mtime_ns
    assert run_continual(str(path)) == results
    assert (out / "sft/02-opposites/adapters.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "extra,pattern",
    [
        ({"learning_rat": 1}, r"unknown option 'learning_rat'"),
        (
            {"stages": [{"name": "a", "data": "x", "lr": 1}]},
            r"stages\[1\] \(a\): unknown option 'lr'",
        ),
        ({"methods": ["rl"]}, r"methods: 'rl' is not one of sdft, sft"),
    ],
)
def test_continual_bad_stage_file_exits_2(tiny_model, tmp_path, extra, pattern):
    import re

    result = runner.invoke(app, ["continual", "-c", str(_stages(tmp_path, tiny_model, **extra))])
    assert result.exit_code == 2, result.output
    assert re.search(pattern, result.stderr) and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["training", "evaluation"])
def test_continual_ctrl_c_is_one_line_and_130(tiny_model, tmp_path, monkeypatch, where):
    """A Ctrl-C while a stage trains (the job raises Interrupted) or while it is evaluated (a bare
    KeyboardInterrupt) ends `continual` as it ends `train`: one line, status 130, how to carry on."""
    import mlx_sdft.jobs.continual as continual
    import mlx_sdft.jobs.train as train
    from mlx_sdft.errors import Interrupted

    def interrupt(*args, **kwargs):
        raise Interrupted(2) if where == "training" else KeyboardInterrupt

    monkeypatch.setattr(train, "run_train", interrupt)
    monkeypatch.setattr(
        continual,
        "evaluate_stage",
        interrupt if where == "evaluation" else lambda *a: {"scores": {}},
    )
    result = runner.invoke(app, ["continual", "-c", str(_stages(tmp_path, tiny_model))])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    line = result.stderr.strip().splitlines()[-1]  # after the console's progress lines
    assert (
        line.startswith("mlx-sdft continual: interrupted") and "run the same command again" in line
    ), line
    assert ("after step 2" in line) == (where == "training")


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_adapters_of_another_model_are_one_line(tiny_model, smoke_data, tmp_path, command):
    """Every command opens adapters through open_model, which checks that each tensor fits (mlx's
    non-strict load would take a foreign one silently), as export did on its own."""
    from tiny import build_model

    foreign = _untrained_adapters(build_model(tmp_path / "wider", hidden=96), tmp_path / "foreign")
    args = ["--data", str(smoke_data)] if command == "eval" else ["--prompt", "Hi"]
    result = runner.invoke(
        app, [command, "--model", str(tiny_model), "--adapter-path", str(foreign), *args]
    )
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "does not fit the model" in line and "in the file but" in line, (
        line
    )  # the tensor and both shapes
