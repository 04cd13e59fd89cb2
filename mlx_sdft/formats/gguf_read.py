"""Read a GGUF file (llama.cpp's format) as an mlx-lm model, tokenizer and config.

`load_gguf` gives what `mlx_lm.load` gives for a model folder, so LoRA and generation work unchanged;
`gguf_to_mlx` writes such a folder. Weights come from `mx.load`; a tensor type MLX cannot read is
dequantized by the `gguf` package instead. The tokenizer is rebuilt from the file's metadata.
llama.cpp's converter changes some weights on the way in; `_undo_convert` reverses that.

    from mlx_sdft.formats.gguf_read import load_gguf, gguf_to_mlx
    model, tokenizer, config = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import importlib
import struct
import tempfile
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import Llama3RoPE
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer_folder
from mlx_lm.utils import save_config, save_model

from mlx_sdft.errors import InputError, one_line
from mlx_sdft.formats.gguf_names import (
    END_OF_TURN,
    MODEL_TYPE,
    SUPPORTED_ARCHITECTURES,
    has_norm_offset,
    is_permuted,
    mlx_name,
    unpermute_rows,
)

GROUP_SIZE = (
    32  # the block size of ggml's Q4_0/Q4_1/Q8_0, which mx.load keeps as mlx quantization groups
)

# llama.cpp splits digits one at a time for these pre-tokenizers; transformers' GGUF table misses them.
_DIGIT_SPLITTING = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def load_gguf(
    path: str | Path, dequantize: bool | None = None
) -> tuple[nn.Module, TokenizerWrapper, dict]:
    """The mlx-lm model, tokenizer and config dict of a GGUF file.

    `dequantize=None` means float32 on the CPU backend (its quantized matmul is far slower) and the
    file's Q4_0/Q4_1/Q8_0 weights kept as `nn.QuantizedLinear` layers elsewhere (QLoRA).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    weights, meta = _read(path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise InputError(f"{path}: architecture {arch!r} is not supported (supported: {supported})")
    config = _config(meta, weights, path)
    weights = _rename(_undo_convert(weights, config), arch, path)
    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    if dequantize:
        weights = _dequantized(weights)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = model.sanitize(weights)
    if quantization := _quantize(model, weights):
        config["quantization"] = quantization
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, _tokenizer(meta, config["eos_token_id"], path), config


def gguf_to_mlx(path: str | Path, out_dir: str | Path, dequantize: bool | None = None) -> Path:
    """Write the GGUF file as an mlx-lm model folder that `mlx_lm.load` and `mlx_lm.generate` read."""
    model, tokenizer, config = load_gguf(path, dequantize)
    out = Path(out_dir)
    save_model(out, model)
    save_config(dict(config), out / "config.json")
    tokenizer.save_pretrained(out)
    return out


def _read(path: Path) -> tuple[dict[str, mx.array], dict]:
    """GGUF tensor name -> array (quantized ones as mlx weight/scales/biases), and the metadata."""
    # BF16 comes back as float16: exact for magnitudes from 6e-5 to 65504, where weights lie.
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
        meta = {k: v.tolist() if isinstance(v, mx.array) else v for k, v in meta.items()}
    except Exception:  # a tensor type MLX cannot read; the gguf package takes every tensor below
        weights, meta = {}, None
    # mx.load skips some types (TQ1_0, MXFP4, ...) without a word: count against the file's header.
    if meta is not None and sum(
        not k.endswith((".scales", ".biases")) for k in weights
    ) == _tensor_count(path):
        return weights, meta
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise InputError(
            one_line(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})")
        ) from None
    for tensor in reader.tensors:
        if tensor.name not in weights:
            weights[tensor.name] = _gguf_dequantize(tensor, path)
    if meta is None:
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return weights, meta


def _tensor_count(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<4sIQ", f.read(16))[2]  # the header: magic, version, tensor count


def _gguf_dequantize(tensor, path: Path) -> mx.array:
    from gguf.quants import dequantize

    try:
        data = dequantize(tensor.data, tensor.tensor_type)
    except Exception:
        raise InputError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
            "which neither MLX nor the gguf package can read"
        ) from None
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dimensions innermost first
    return mx.array(np.asarray(data, dtype=np.float32).reshape(shape))


def _config(meta: dict, weights: dict, path: Path) -> dict:
    """The mlx-lm config (HF key names) that the file's `{arch}.*` metadata describes."""
    arch = meta["general.architecture"]
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    heads, hidden, layers = get("attention.head_count"), get("embedding_length"), get("block_count")
    head_dim = get("attention.key_length", hidden // heads)
    eos = [
        meta[k]
        for k in (f"tokenizer.ggml.{e}_token_id" for e in ("eos", "eot", "eom"))
        if k in meta
    ]
    eos += [
        i
        for i, t in enumerate(meta.get("tokenizer.ggml.tokens", []))
        if t in END_OF_TURN and i not in eos
    ]
    config = {
        "model_type": MODEL_TYPE[arch],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "head_dim": head_dim,
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": float(
            f"{get('attention.layer_norm_rms_epsilon', 1e-6):.6g}"
        ),  # stored as float32
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": weights["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight"
        not in weights,  # llama.cpp writes no `output` when tied
        "attention_bias": "blk.0.attn_q.bias" in weights,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if (kind := get("rope.scaling.type", "none")) not in ("none", "linear"):
        raise InputError(
            f"{path}: RoPE scaling {kind!r} is not supported (only linear and Llama 3's)"
        )
    if kind == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    if "rope_freqs.weight" in weights:
        config["rope_scaling"] = _llama3_rope(
            weights["rope_freqs.weight"], config["rope_theta"], head_dim, path
        )
    if arch == "gemma3":  # llama.cpp fixes these for Gemma 3 instead of reading them from the file
        window = get("attention.sliding_window", 0)
        config.update(
            sliding_window=window or config["max_position_embeddings"],
            sliding_window_pattern=6 if window else 1,
            rope_local_base_freq=float(get("rope.freq_base_swa", 10000.0)),
            query_pre_attn_scalar=hidden // heads
            if layers == 62
            else head_dim,  # 27B scales by hidden/heads
        )
    return config


def _llama3_rope(rope_factors: mx.array, base: float, dims: int, path: Path) -> dict:
    """Llama 3's RoPE scaling, which llama.cpp stores as one divisor per frequency (`rope_freqs`)."""
    scaling = {
        "rope_type": "llama3",
        "factor": rope_factors.max().item(),
    }  # mlx-lm's defaults for the rest
    wanted = base ** (mx.arange(0, dims, 2) / dims) * rope_factors.astype(mx.float32)
    if not mx.allclose(
        Llama3RoPE(dims, base=base, scaling_config=scaling)._freqs, wanted, rtol=1e-3
    ).item():
        raise InputError(
            f"{path}: rope_freqs holds RoPE factors other than Llama 3's default scaling"
        )
    return scaling


def _undo_convert(weights: dict, config: dict) -> dict:
    """Reverse what llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows and Gemma norms."""
    out = {}
    for name, w in weights.items():
        if is_permuted(name, config["model_type"]):
            part = name.split(".")[-2]
            w = unpermute_rows(
                w, config["num_attention_heads" if part == "attn_q" else "num_key_value_heads"]
            )
        if has_norm_offset(name, config["model_type"]):
            w = w.astype(mx.float32) - 1
        if name != "rope_freqs.weight":  # folded into config["rope_scaling"]
            out[name] = w
    return out


def _rename(weights: dict, arch: str, path: Path) -> dict:
    """llama.cpp tensor names (`blk.3.attn_q.weight`) -> mlx-lm parameter names."""
    out = {}
    for name, w in weights.items():
        mapped = mlx_name(name, arch)
        if mapped is None:
            raise InputError(
                f"{path}: tensor {name} has no counterpart in mlx-lm's {MODEL_TYPE[arch]} model"
            )
        out[mapped] = w
    return out


def _bits(packed: mx.array, scales: mx.array) -> int:
    return packed.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)


def _quantize(model: nn.Module, weights: dict) -> dict | None:
    """Make each layer whose weight mx.load kept packed a quantized layer; the config's `quantization`."""
    stems = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    bits = {s: _bits(weights[f"{s}.weight"], weights[f"{s}.scales"]) for s in stems}
    if not bits:
        return None
    nn.quantize(
        model,
        class_predicate=lambda p, _: p in bits and {"group_size": GROUP_SIZE, "bits": bits[p]},
    )
    # mlx_lm.load reads each layer's bits off its weights; the config's are only the default
    return {
        "group_size": GROUP_SIZE,
        "bits": Counter(bits.values()).most_common(1)[0][0],
        "mode": "affine",
    }


def _dequantized(weights: dict) -> dict:
    """Every weight as float32; scales and biases widened first, so no float16 rounding is added."""
    out = {}
    for name, w in weights.items():
        stem = name[: -len(".weight")]
        if name.endswith((".scales", ".biases")) and name.rsplit(".", 1)[0] + ".weight" in weights:
            continue
        if name.endswith(".weight") and f"{stem}.scales" in weights:
            scales, biases = (
                weights[f"{stem}.{k}"].astype(mx.float32) for k in ("scales", "biases")
            )
            w = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=_bits(w, scales))
        out[name] = w.astype(mx.float32)
    return out


def _tokenizer(meta: dict, eos_token_id, path: Path) -> TokenizerWrapper:
    """The file's tokenizer, chat template and end tokens, loaded the way mlx-lm loads a folder's."""
    with tempfile.TemporaryDirectory() as folder:
        _hf_tokenizer(meta, path).save_pretrained(folder)
        return load_tokenizer_folder(Path(folder), eos_token_ids=eos_token_id)


def _hf_tokenizer(meta: dict, path: Path):
    # transformers' own GGUF tokenizer builders; its `gguf_file=` route would also need PyTorch.
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    keys = GGUF_TOKENIZER_MAPPING["tokenizer"].items()
    spec = {name: meta[f"tokenizer.{key}"] for key, name in keys if f"tokenizer.{key}" in meta}
    if "tokens" not in spec:
        raise InputError(f"{path}: the file has no tokenizer (no tokenizer.ggml.tokens)")
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], spec)
    if spec.get("pre_tokenizer_type") in _DIGIT_SPLITTING:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
    ids = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    special = {
        f"{name}_token": spec["tokens"][meta[f"tokenizer.ggml.{key}_token_id"]]
        for name, key in ids.items()
        if f"tokenizer.ggml.{key}_token_id" in meta
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=meta.get("tokenizer.chat_template"),
        **special,
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise
        add_bos_token=meta.get(
            "tokenizer.ggml.add_bos_token", spec.get("tokenizer_type") == "llama"
        ),
        add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
    )
