"""Every command opens its model one way (mlx_sdft/opening.py): eval, check and generate honour
--chat-template and --dequantize as train does, and continual evaluates with the training's.

    python -m pytest tests/jobs/test_opening.py
"""

from __future__ import annotations

import pytest
from conftest import ROOT
from tiny import CHAT_TEMPLATE, build_model
from typer.testing import CliRunner

from mlx_sdft.cli import app

runner = CliRunner()
DATA = str(ROOT / "recipes" / "smoke" / "data")
FAST = {
    "eval": ["--data", DATA, "--max-tokens", "2", "--output", "eval"],
    "check": ["--data", DATA, "--num-examples", "2", "--num-samples", "1", "--max-tokens", "2"],
    "generate": ["--prompt", "Hi", "--max-tokens", "2"],
}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory):
    """The tiny model as a Q8_0 GGUF file, written by export."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    result = runner.invoke(
        app, ["export", "--model", str(tiny_model), "--out", str(path), "--outtype", "q8_0"]
    )
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """The tiny model with a tokenizer that has no chat template."""
    return build_model(tmp_path_factory.mktemp("bare") / "model", chat_template=None)


@pytest.mark.parametrize("command", FAST)
def test_no_dequantize_keeps_a_gguf_quantized(command, tiny_gguf, tmp_path, monkeypatch):
    """--no-dequantize opens the file's quantized weights (the cache's -q folder), not the CPU's
    default float32 ones (-f32)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_SDFT_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(
        app, [command, "--model", str(tiny_gguf), "--no-dequantize", *FAST[command]]
    )
    assert result.exit_code == 0, result.output
    assert [p.name.rsplit("-", 1)[1] for p in (tmp_path / "cache" / "gguf").iterdir()] == ["q"]


@pytest.mark.parametrize("command", FAST)
def test_chat_template_is_checked_before_the_weights_and_honoured(
    command, bare_model, tmp_path, monkeypatch
):
    import mlx_sdft.formats.models as models

    monkeypatch.chdir(tmp_path)
    real = models.load_model
    monkeypatch.setattr(
        models,
        "load_model",
        lambda *a, **k: pytest.fail("weights loaded before the template check"),
    )
    result = runner.invoke(app, [command, "--model", str(bare_model), *FAST[command]])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert (
        line.startswith(f"mlx-sdft {command}: error: ")
        and "no chat template: pass --chat-template" in line
    )
    monkeypatch.setattr(models, "load_model", real)
    result = runner.invoke(
        app, [command, "--model", str(bare_model), "--chat-template", CHAT_TEMPLATE, *FAST[command]]
    )
    assert result.exit_code == 0, result.output


def test_continual_evaluates_with_the_training_template_and_dequantize(tiny_model, tmp_path):
    from mlx_sdft.jobs.continual import eval_config, read_stages

    (tmp_path / "chatml.jinja").write_text(CHAT_TEMPLATE)
    stages = tmp_path / "stages.yaml"
    stages.write_text(
        f"model: {tiny_model}\ndequantize: false\nchat_template: chatml.jinja\n"
        f"stages:\n  - {{name: smoke, data: {DATA}}}\n"
    )
    run = read_stages(str(stages))
    ecfg = eval_config(run, run["stages"][0], None)
    assert ecfg.dequantize is False and ecfg.chat_template == CHAT_TEMPLATE
