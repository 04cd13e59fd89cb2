"""Write an mlx-lm model (adapters already fused, see `fuse.fuse_adapters`) as a GGUF file that
llama.cpp, Ollama and LM Studio run.

The inverse of `gguf_read`: the same name table and weight changes (`gguf_names`), the
hyperparameters under llama.cpp's `{arch}.*` keys, the tokenizer from `gguf_vocab`. Weights go
out as llama.cpp's converter writes them: matrices as F16 or Q8_0 (quantized by the `gguf`
package), norms and other vectors as F32.

    write_gguf(fuse_adapters(model), tokenizer, "model.gguf", "q8_0", source=Path("base.gguf"))
"""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_sdft.errors import InputError
from mlx_sdft.formats.gguf_names import (
    ARCHITECTURE,
    gguf_name,
    has_norm_offset,
    is_permuted,
    permute_rows,
)
from mlx_sdft.formats.gguf_vocab import copy_tokenizer, hf_tokenizer_fields

OUTTYPES = ("f16", "q8_0")
_FILE_TYPE = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
DEFAULT_CONTEXT = (
    4096  # written when the model's config names no max_position_embeddings (llama.cpp needs one)
)


def architecture(config: dict, where: str) -> str:
    """The GGUF architecture of an mlx-lm config; InputError for one the writer (and reader) lacks."""
    arch = ARCHITECTURE.get(config.get("model_type"))
    if arch is None:
        supported = ", ".join(ARCHITECTURE)
        raise InputError(
            f"{where}: model type {config.get('model_type')!r} cannot be written as GGUF "
            f"(supported: {supported})"
        )
    return arch


def write_gguf(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    outtype: str = "f16",
    source: Path | None = None,
    name: str | None = None,
) -> dict:
    """Write `model` (plain float layers) and its tokenizer to `path`.

    `source`: the GGUF file the model came from; its `tokenizer.*` metadata is copied as it is.
    Else the tokenizer is described from the Hugging Face one (byte-level BPE only).
    Returns the vocabulary facts the Ollama Modelfile needs: {"tokens", "end_ids", "chat_template"}.
    Raises InputError for a model type, hyperparameter or tokenizer llama.cpp cannot express.
    """
    args = model.args
    arch = architecture({"model_type": args.model_type}, str(path))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name or Path(path).stem)
    writer.add_file_type(_FILE_TYPE[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyperparameters(writer, args, arch)
    if source is not None:
        vocab = copy_tokenizer(writer, source)
    else:
        vocab = hf_tokenizer_fields(
            writer, tokenizer._tokenizer, args.vocab_size, tokenizer.eos_token_ids
        )
    for tensor, array in gguf_tensors(model):
        _add_tensor(writer, tensor, array, outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return vocab


def gguf_tensors(model: nn.Module):
    """(GGUF tensor name, float32 array in GGUF's row order) for every weight, converted as
    llama.cpp's convert_hf_to_gguf.py converts them, and llama 3's RoPE factors (`rope_freqs`)."""
    args = model.args
    arch = ARCHITECTURE[args.model_type]
    for name, w in tree_flatten(model.parameters()):
        tensor = gguf_name(name, arch)
        if tensor is None:
            raise InputError(f"parameter {name} has no GGUF tensor in llama.cpp's {arch} model")
        if is_permuted(tensor, args.model_type):
            heads = args.num_attention_heads if ".attn_q." in tensor else args.num_key_value_heads
            w = permute_rows(w, heads or args.num_attention_heads)
        w = w.astype(mx.float32)
        if has_norm_offset(tensor, args.model_type):
            w = w + 1
        yield tensor, np.array(w)
    rope = model.layers[0].self_attn.rope
    if (getattr(args, "rope_scaling", None) or {}).get("rope_type") == "llama3":
        # one divisor per rotary frequency, which gguf_read turns back into rope_scaling
        dims = rope.dims
        yield (
            "rope_freqs.weight",
            np.array(rope._freqs / args.rope_theta ** (mx.arange(0, dims, 2) / dims)),
        )


def _add_tensor(writer: gguf.GGUFWriter, tensor: str, array: np.ndarray, outtype: str) -> None:
    if array.ndim == 1:
        writer.add_tensor(tensor, array.astype(np.float32))
    elif (
        outtype == "q8_0" and array.shape[-1] % 32 == 0
    ):  # Q8_0 blocks of 32 along a row, as llama.cpp's
        quant = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(tensor, gguf.quants.quantize(array, quant), raw_dtype=quant)
    else:
        writer.add_tensor(tensor, array.astype(np.float16))


def _hyperparameters(w: gguf.GGUFWriter, args, arch: str) -> None:
    """The `{arch}.*` keys gguf_read._config reads back (and llama.cpp needs)."""
    heads, hidden = args.num_attention_heads, args.hidden_size
    head_dim = getattr(args, "head_dim", None) or hidden // heads
    w.add_context_length(getattr(args, "max_position_embeddings", None) or DEFAULT_CONTEXT)
    w.add_embedding_length(hidden)
    w.add_block_count(args.num_hidden_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(args.num_key_value_heads or heads)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_vocab_size(args.vocab_size)
    if head_dim != hidden // heads or arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if getattr(args, "rope_traditional", False):
        raise InputError(f"rope_traditional: llama.cpp's {arch} rotates the other half-pairing")
    if getattr(args, "mlp_bias", False) or any(
        t != "full_attention" for t in getattr(args, "layer_types", None) or []
    ):
        raise InputError(f"mlp_bias or sliding-window layers: llama.cpp's {arch} has neither")
    scaling = getattr(args, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default") and not (kind == "llama3" and arch == "llama"):
        raise InputError(f"rope_scaling {kind!r}: only linear and llama 3's are written")
    if arch == "gemma3":
        # llama.cpp fixes Gemma 3's local/global pattern (5 local, 1 global) and its query scale
        if args.sliding_window_pattern != 6:
            raise InputError(
                f"sliding_window_pattern {args.sliding_window_pattern}: llama.cpp's gemma3 fixes it at 6"
            )
        expected = hidden // heads if args.num_hidden_layers == 62 else head_dim
        if args.query_pre_attn_scalar != expected:
            raise InputError(
                f"query_pre_attn_scalar {args.query_pre_attn_scalar}: llama.cpp's gemma3 uses {expected}"
            )
        w.add_sliding_window(args.sliding_window)
        w.add_float32(
            f"{arch}.rope.freq_base_swa", args.rope_local_base_freq
        )  # older gguf packages lack the helper
