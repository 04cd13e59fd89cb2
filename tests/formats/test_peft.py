"""`mlx-sdft export --format peft`: key names, shapes and config as PEFT writes them, and PEFT's
LoRA/DoRA forward (peft/tuners/lora/layer.py and dora.py), re-implemented in numpy on the exported
tensors, equals our adapted layers' output."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file
from test_export import export, make_adapters
from tiny import build_model

from mlx_sdft.formats.models import open_model

LINEARS = [
    "mlp.down_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "self_attn.k_proj",
    "self_attn.o_proj",
    "self_attn.q_proj",
    "self_attn.v_proj",
]
LORA = {"rank": 4, "scale": 2.5, "dropout": 0.05}


def peft_forward(x, W, A, B, alpha, r, magnitude=None):
    """PEFT's Linear.forward: x Wᵀ + (x Aᵀ Bᵀ)·alpha/r; with DoRA, scaled by magnitude / ‖W + (alpha/r)·B A‖_row."""
    scaling = alpha / r
    y = x @ W.T + (x @ A.T @ B.T) * scaling
    if magnitude is None:
        return y
    norm = np.linalg.norm(W + scaling * (B @ A), axis=1)
    return (magnitude / norm) * y


@pytest.fixture
def folder(tmp_path):
    return build_model(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_folder_matches_the_adapted_layers(tmp_path, folder, kind):
    adapters = make_adapters(tmp_path / "adapters", folder, kind, num_layers=1, lora=LORA)
    result = export(
        "--model",
        folder,
        "--adapter-path",
        adapters,
        "--format",
        "peft",
        "--out",
        tmp_path / "peft",
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {
        k: config[k]
        for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_dora")
    } == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 10,
        "lora_dropout": 0.05,
        "use_dora": kind == "dora",
    }
    assert config["target_modules"] == LINEARS and config["layers_to_transform"] == [1]
    assert config["base_model_name_or_path"] == str(folder)
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    per_module = 3 if kind == "dora" else 2
    assert len(tensors) == per_module * len(LINEARS)
    base = dict(tree_flatten(open_model(folder)[0].parameters()))
    adapted, _ = open_model(folder, adapters=adapters)
    rng = np.random.default_rng(0)
    for path in LINEARS:
        key = f"base_model.model.model.layers.1.{path}"
        A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        W = np.array(base[f"model.layers.1.{path}.weight"])
        assert A.shape == (4, W.shape[1]) and B.shape == (W.shape[0], 4)
        magnitude = tensors.get(f"{key}.lora_magnitude_vector")
        assert (magnitude is not None) == (kind == "dora")
        x = rng.standard_normal((3, W.shape[1])).astype(np.float32)
        layer = dict(adapted.named_modules())[f"model.layers.1.{path}"]
        want = np.array(layer(mx.array(x)))
        got = peft_forward(x, W, A, B, config["lora_alpha"], config["r"], magnitude)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=path)
        assert np.abs(got - x @ W.T).max() > 1e-2  # the adapter is not a no-op


def test_what_peft_cannot_express_is_one_line(tmp_path, folder):
    embedding = {**LORA, "keys": ["self_attn.q_proj", "model.embed_tokens"]}
    cases = {
        "LoRAEmbedding adapter has no PEFT LoRA counterpart": make_adapters(
            tmp_path / "e", folder, lora=embedding
        ),
        "--format peft: needs LoRA or DoRA adapters": make_adapters(
            tmp_path / "f", folder, "full", num_layers=1
        ),
    }
    for message, adapters in cases.items():
        result = export(
            "--model",
            folder,
            "--adapter-path",
            adapters,
            "--format",
            "peft",
            "--out",
            tmp_path / "p",
        )
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p").exists()
    result = export("--model", folder, "--format", "peft", "--out", tmp_path / "p")
    assert result.exit_code == 2 and "needs LoRA or DoRA adapters" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_and_transformers_load_the_folder(tmp_path, folder, kind):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    adapters = make_adapters(tmp_path / "adapters", folder, kind, num_layers=2, lora=LORA)
    result = export(
        "--model", folder, "--adapter-path", adapters, "--format", "peft", "--out", tmp_path / "p"
    )
    assert result.exit_code == 0, result.output
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "p")).eval()
    ids = [[1, 5, 17, 42, 99]]
    with torch.no_grad():
        got = model(torch.tensor(ids)).logits.numpy()
    want = np.array(open_model(folder, adapters=adapters)[0](mx.array(ids)))
    base_logits = np.array(open_model(folder)[0](mx.array(ids)))
    assert (
        np.abs(want - base_logits).max() > 0.1
    )  # a PEFT model that dropped the adapters would fail below
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
