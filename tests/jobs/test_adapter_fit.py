"""Adapters that do not fit the model or the options stop with one line naming the file, the
first mismatching tensor and both shapes (exit 2): --resume-adapter-file, --resume, eval, generate."""

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.config import load_config
from mlx_sdft.jobs.train import run_train
from tiny import build_model

runner = CliRunner()
LAYER0_A = "model.layers.0.mlp.down_proj.lora_a"  # the first mismatching tensor, by name


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same tokenizer, hidden size 32 instead of 64."""
    return build_model(tmp_path_factory.mktemp("other") / "model", hidden=32)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One-step adapters of the tiny model: rank 8 (default) and rank 4."""
    from conftest import ROOT

    folders = {}
    for rank in (8, 4):
        out = tmp_path_factory.mktemp(f"rank{rank}") / "adapters"
        run_train(
            load_config(
                None,
                dict(
                    model=str(tiny_model),
                    data=str(ROOT / "recipes/smoke/data"),
                    adapter_path=str(out),
                    num_layers=-1,
                    iters=1,
                    batch_size=2,
                    max_completion_length=6,
                    val_batches=1,
                    lora_parameters={"rank": rank, "scale": 20.0, "dropout": 0.0},
                ),
            ),
            quiet=True,
        )
        folders[rank] = out
    return folders


def _error(result, pattern):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, lines[0]), lines[0]


def _train(model, data, out, *args):
    return runner.invoke(
        app,
        [
            "train",
            "--model",
            str(model),
            "--data",
            str(data),
            "--adapter-path",
            str(out),
            "--num-layers",
            "-1",
            "--iters",
            "1",
            "--batch-size",
            "2",
            "--max-completion-length",
            "6",
            *map(str, args),
        ],
    )


def test_resume_adapter_file_of_another_model(other_model, smoke_data, trained, tmp_path):
    out = tmp_path / "a"
    _error(
        _train(
            other_model,
            smoke_data,
            out,
            "--resume-adapter-file",
            trained[8] / "adapters.safetensors",
        ),
        rf"adapters.safetensors: does not fit the model and options: {LAYER0_A} is 128x8 in the file but 64x8 here",
    )
    assert not out.exists()


def test_rank_4_adapters_under_rank_8(tiny_model, smoke_data, trained, tmp_path):
    out = tmp_path / "a"
    _error(
        _train(
            tiny_model,
            smoke_data,
            out,
            "--resume-adapter-file",
            trained[4] / "adapters.safetensors",
        ),
        rf"does not fit the model and options: {LAYER0_A} is 128x4 in the file but 128x8 here",
    )
    assert not out.exists()


def test_a_folder_says_which_file_to_name(tiny_model, smoke_data, trained, tmp_path):
    """mlx_lm.lora's --resume-adapter-file is a file: a folder says which file to name."""
    _error(
        _train(tiny_model, smoke_data, tmp_path / "a", "--resume-adapter-file", trained[8]),
        r"adapters: a folder; name the adapter file in it \(.*adapters/adapters.safetensors\)",
    )
    assert not (tmp_path / "a").exists()


def test_another_scale_or_type_is_named(tiny_model, smoke_data, trained, tmp_path):
    folder = tmp_path / "scaled"
    shutil.copytree(trained[8], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"]["scale"] = 10.0
    (folder / "adapter_config.json").write_text(json.dumps(config))
    _error(
        _train(
            tiny_model,
            smoke_data,
            tmp_path / "a",
            "--resume-adapter-file",
            folder / "adapters.safetensors",
        ),
        r"scaled/adapters.safetensors: saved with lora_parameters.scale 10.0 \(its adapter_config.json\) but this "
        r"run uses 20.0",
    )
    _error(
        _train(
            tiny_model,
            smoke_data,
            tmp_path / "b",
            "--resume-adapter-file",
            trained[8] / "adapters.safetensors",
            "--fine-tune-type",
            "full",
        ),
        r"does not fit the model and options: it holds model.layers.0.mlp.down_proj.lora_a \(128x8\), which "
        r"--fine-tune-type full with this --num-layers does not train here",
    )
    _error(
        _train(
            tiny_model,
            smoke_data,
            tmp_path / "c",
            "--resume-adapter-file",
            trained[8] / "adapters.safetensors",
            "--num-layers",
            "1",
        ),
        r"it holds model.layers.0.mlp.down_proj.lora_a \(128x8\), which --fine-tune-type lora with this "
        r"--num-layers does not train here",
    )


def test_eval_and_generate_with_another_models_adapters(other_model, smoke_data, trained, tmp_path):
    pattern = rf"adapters.safetensors: does not fit the model and options: {LAYER0_A} is 128x8 in the file but 64x8"
    out = tmp_path / "eval"
    _error(
        runner.invoke(
            app,
            [
                "eval",
                "--model",
                str(other_model),
                "--data",
                str(smoke_data),
                "--adapter-path",
                str(trained[8]),
                "--output",
                str(out),
            ],
        ),
        pattern,
    )
    assert not out.exists()
    _error(
        runner.invoke(
            app,
            [
                "generate",
                "--model",
                str(other_model),
                "--adapter-path",
                str(trained[8]),
                "--prompt",
                "Hi",
            ],
        ),
        pattern,
    )


def test_generate_with_fitting_adapters_answers(tiny_model, trained):
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_model),
            "--adapter-path",
            str(trained[8]),
            "--prompt",
            "Hi",
            "--max-tokens",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output


def test_resume_with_replaced_adapters(tiny_model, other_model, smoke_data, tmp_path):
    out = tmp_path / "run"
    assert _train(tiny_model, smoke_data, out, "--iters", "2", "--save-every", "1").exit_code == 0
    wrong = tmp_path / "wrong"
    assert _train(other_model, smoke_data, wrong).exit_code == 0
    shutil.copy(wrong / "adapters.safetensors", out / "adapters.safetensors")
    _error(
        _train(tiny_model, smoke_data, out, "--iters", "2", "--save-every", "1", "--resume"),
        rf"run/adapters.safetensors: does not fit the model and options: {LAYER0_A} is 64x8 in the file but 128x8",
    )
