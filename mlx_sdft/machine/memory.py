"""Memory preflight: estimate a run's peak memory from the model config and the options,
before any weights load, and compare it with what the machine can give.

The estimate is deliberately simple (every term below is written out) and is logged next
to the measured peak in metrics.jsonl, so it can be checked and improved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx

GB = 1e9
F32 = 4


def weight_bytes(model_path: Path) -> int:
    files = list(model_path.glob("*.safetensors")) or list(model_path.glob("*.gguf"))
    return sum(f.stat().st_size for f in files)


def dimensions(config: dict) -> tuple[int, int, int, int]:
    """(hidden, intermediate, query width = heads·head_dim, key/value width) of a block."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    return (
        h,
        config.get("intermediate_size", 4 * h),
        heads * head_dim,
        config.get("num_key_value_heads", heads) * head_dim,
    )


def block_linears(config: dict) -> list[tuple[int, int]]:
    """(in, out) of a block's seven linears: q, k, v, o, gate, up, down."""
    h, i, q, kv = dimensions(config)
    return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]


def adapted_blocks(config: dict, cfg) -> int:
    blocks = config["num_hidden_layers"]
    return blocks if cfg.num_layers < 0 else min(cfg.num_layers, blocks)


def trainable_count(config: dict, cfg) -> int:
    """Parameters that train: LoRA r·(in+out) per adapted linear, or whole blocks (linears and their
    two norms) for full."""
    if cfg.fine_tune_type == "full":
        return adapted_blocks(config, cfg) * (
            sum(a * b for a, b in block_linears(config)) + 2 * config["hidden_size"]
        )
    r, dora = (
        cfg.lora_parameters["rank"],
        cfg.fine_tune_type == "dora",
    )  # DoRA adds a magnitude per output
    return adapted_blocks(config, cfg) * sum(
        r * (a + b) + dora * b for a, b in block_linears(config)
    )


def base_parameters(config: dict) -> int | None:
    """The model's parameters as `mlx_lm.lora` counts them, from config.json alone: blocks' linears
    and norms, embeddings, an untied head (biases left out). None for a config it cannot read."""
    if (
        not {"hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"}
        <= config.keys()
    ):
        return None
    h, blocks = config["hidden_size"], config["num_hidden_layers"]
    embeddings = config["vocab_size"] * h * (1 if config.get("tie_word_embeddings", True) else 2)
    return blocks * (sum(a * b for a, b in block_linears(config)) + 2 * h) + h + embeddings


def parameter_summary(config: dict, cfg) -> str | None:
    """`mlx_lm.lora`'s "Trainable parameters: 0.180% (0.242M/134.515M)": `base_parameters` and the
    adapters. None for a config it cannot read."""
    total = base_parameters(config)
    if total is None:
        return None
    trainable = trainable_count(config, cfg)
    total += 0 if cfg.fine_tune_type == "full" else trainable
    return f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)"


def fused_copy_bytes(config: dict, weights: int, cfg) -> int:
    """The fused weights `rollout.fused_adapters` holds while sampling: a copy of every adapted
    linear, in the precision of the `weights` bytes on disk. Adapters over quantized weights
    are not fused."""
    if (
        cfg.method != "sdft"
        or not cfg.fuse_sampling
        or cfg.fine_tune_type != "lora"
        or "quantization" in config
    ):
        return 0
    per_block = sum(a * b for a, b in block_linears(config))
    embeddings = (
        config["vocab_size"]
        * config["hidden_size"]
        * (1 if config.get("tie_word_embeddings", True) else 2)
    )
    bytes_per_param = weights / (config["num_hidden_layers"] * per_block + embeddings)
    return int(adapted_blocks(config, cfg) * per_block * bytes_per_param)


def logit_positions(cfg, T: int) -> int:
    return min(T, 4 * cfg.logits_chunk) if cfg.logits_chunk and cfg.method == "sdft" else T


def estimate(
    config: dict,
    model_path: Path,
    cfg,
    prompt_len: int,
    teacher_prompt_len: int,
    demo_len: int = 0,
    completion_len: int | None = None,
) -> dict[str, float]:
    """Bytes per component at the peak of a step (GB). n = sequences per micro-batch; `demo_len`,
    the longest demonstration in tokens, sizes SDFT's --sft-weight term; `completion_len`, the
    longest completion the run can score (SDFT: its longest completion budget; SFT: its longest
    demonstration), defaults to --max-completion-length."""
    n = cfg.batch_size * (cfg.num_generations if cfg.method == "sdft" else 1)
    T = cfg.max_completion_length if completion_len is None else completion_len
    h, i, _, kv = dimensions(config)
    layers, V = config["num_hidden_layers"], config["vocab_size"]
    L = max(prompt_len, teacher_prompt_len) + T
    weights = weight_bytes(model_path)
    parts = {
        "weights": weights,
        # student, gradient, Adam m and v, EMA teacher, base snapshot
        "trainable_states": 6 * trainable_count(config, cfg) * F32,
        # keys and values of every layer while sampling
        "kv_cache": 2 * layers * kv * (prompt_len + T) * n * F32 if cfg.method == "sdft" else 0,
        "fused_copy": fused_copy_bytes(config, weights, cfg),
        # activations kept for the backward pass: ~12 hidden-sized and 3 MLP-sized tensors per layer
        "activations": n
        * L
        * layers
        * (12 * h + 3 * i)
        * F32
        // (layers if cfg.grad_checkpoint else 1),
        # student logits, log-softmax and its gradient; teacher logits and log-softmax (and the
        # base model's logits with --base-kl-weight). In chunks (--logits-chunk) a few chunks are
        # alive at once, not all T positions.
        "logits": n
        * logit_positions(cfg, T)
        * V
        * F32
        * ((5 + bool(cfg.base_kl_weight)) if cfg.method == "sdft" else 3),
        # --sft-weight: a second student pass over prompt + demonstration in the same backward, its
        # activations and its logits, log-softmax and gradient over the demonstration
        "sft_term": cfg.batch_size
        * (
            (prompt_len + demo_len)
            * layers
            * (12 * h + 3 * i)
            // (layers if cfg.grad_checkpoint else 1)
            + 3 * demo_len * V
        )
        * F32
        if cfg.method == "sdft" and cfg.sft_weight
        else 0,
    }
    parts["peak"] = (
        parts["weights"]
        + parts["trainable_states"]
        + max(
            parts["kv_cache"] + parts["fused_copy"],
            parts["activations"] + parts["logits"] + parts["sft_term"],
        )
    )
    return {k: v / GB for k, v in parts.items()}


def available_gb() -> tuple[float, str]:
    """What the machine can give: Metal's recommended working set, a CUDA GPU's memory, else RAM."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if mx.metal.is_available() and "max_recommended_working_set_size" in info:
        return info["max_recommended_working_set_size"] / GB, "Metal recommended working set"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        total = info.get("total_memory", info.get("memory_size"))
        if total:
            return total / GB, "GPU memory"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, "system RAM"


def model_config(model_path: Path) -> dict:
    path = model_path / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return config.get("text_config", config)


def describe(parts: dict[str, float]) -> str:
    return (
        ", ".join(f"{k} {v:.2f} GB" for k, v in parts.items() if k != "peak")
        + f"; peak ≈ {parts['peak']:.2f} GB"
    )


LOWER_IT = "--batch-size, --max-completion-length, --max-seq-length, --num-layers, --grad-checkpoint, --logits-chunk, --topk"
