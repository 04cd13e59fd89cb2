"""What llama.cpp's converter changes between an mlx-lm model and a GGUF file, in both directions.

One table of tensor names and the two weight changes (llama's Q/K row order, Gemma's norm
offset), shared by the reader (`gguf_read`) and the writer (`gguf_write`), so a round trip is the
identity by construction. Source: llama.cpp's gguf-py `tensor_mapping.py` and
`convert_hf_to_gguf.py` (`LlamaModel.permute`, `Gemma3Model.modify_tensors`).
"""

from __future__ import annotations

import mlx.core as mx

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
MODEL_TYPE = {
    "llama": "llama",
    "qwen2": "qwen2",
    "gemma3": "gemma3_text",
}  # GGUF architecture -> mlx-lm
ARCHITECTURE = {model_type: arch for arch, model_type in MODEL_TYPE.items()}

TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per block, and llama.cpp's `ffn_norm` is the one before its MLP.
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Tokens llama.cpp also ends a generation on when the vocabulary has them (its end-of-generation list).
END_OF_TURN = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
)


def block_names(arch: str) -> dict[str, str]:
    """llama.cpp block tensor part (`attn_q`) -> mlx-lm module path inside a block (`self_attn.q_proj`)."""
    return GEMMA3_BLOCK_NAMES if arch == "gemma3" else BLOCK_NAMES


def mlx_name(name: str, arch: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when mlx-lm has no such tensor."""
    stem, leaf = name.rsplit(".", 1)
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        blocks = block_names(arch)
        return part in blocks and f"model.layers.{index}.{blocks[part]}.{leaf}" or None
    return stem in TOP_NAMES and f"{TOP_NAMES[stem]}.{leaf}" or None


def gguf_name(name: str, arch: str) -> str | None:
    """The inverse of `mlx_name`: `model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`."""
    stem, leaf = name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        index, path = stem.removeprefix("model.layers.").split(".", 1)
        part = {v: k for k, v in block_names(arch).items()}.get(path)
        return part and f"blk.{index}.{part}.{leaf}"
    top = {v: k for k, v in TOP_NAMES.items()}.get(stem)
    return top and f"{top}.{leaf}"


def is_permuted(gguf_tensor: str, model_type: str) -> bool:
    """llama.cpp reorders the rows of llama's Q and K projections (weights and biases)."""
    part = gguf_tensor.split(".")[-2] if gguf_tensor.startswith("blk.") else ""
    return model_type == "llama" and part in ("attn_q", "attn_k")


def has_norm_offset(gguf_tensor: str, model_type: str) -> bool:
    """Gemma's norms are stored as 1 + w; mlx-lm's Gemma RMSNorm adds the 1 itself."""
    return model_type == "gemma3_text" and gguf_tensor.endswith("norm.weight")


def permute_rows(w: mx.array, heads: int) -> mx.array:
    """llama.cpp's `LlamaModel.permute`: interleave each head's two rotary halves (rows only)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def unpermute_rows(w: mx.array, heads: int) -> mx.array:
    """Inverse of `permute_rows`. Only rows move and quantization groups lie within rows, so packed
    weights, scales and biases are permuted as they are, with no dequantizing."""
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )
