"""What every benchmark here shares: the model shapes, the fixed batch, the machine description
and the FLOP count of a student forward+backward.

Kept apart from bench.py so that trl_bench.py (run by another interpreter, without MLX) can read
the same shapes and lengths: this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
from pathlib import Path

# SmolLM2-135M-Instruct's llama shapes (random weights: the benchmarks time shapes, not answers).
SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "max_position_embeddings": 8192,
}
TINY = {
    **SMOLLM2,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 512,
}

# One optimizer step: `batch` prompts, one generation each. The teacher prompt is longer, as a
# demonstration in context makes it. Completions have a fixed length (no stop token), so every
# side scores exactly batch * completion positions.
FULL = {
    "model": SMOLLM2,
    "batch": 4,
    "student_len": 64,
    "teacher_len": 160,
    "completion": 48,
    "lora_rank": 8,
    "warmup": 1,
    "reps": 2,
    "matmul_n": 2048,
}
QUICK = {
    "model": TINY,
    "batch": 4,
    "student_len": 16,
    "teacher_len": 40,
    "completion": 8,
    "lora_rank": 8,
    "warmup": 1,
    "reps": 1,
    "matmul_n": 256,
}
SEED = 0


def blas() -> str:
    """Which BLAS MLX's matmuls run on: `mlx_sdft.machine.blas.describe`, loaded from its file, because
    importing the mlx_sdft package would preload OpenBLAS into TRL's torch process too."""
    spec = importlib.util.spec_from_file_location(
        "mlx_sdft_blas", Path(__file__).parents[1] / "mlx_sdft" / "machine" / "blas.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.describe()


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    which = blas()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "blas": which,
        "openblas": which.startswith("OpenBLAS"),
    }


def student_flops(m: dict, batch: int, input_len: int, completion: int, rank: int) -> dict:
    """FLOPs of one student forward+backward (matmuls only; elementwise work is not counted).

    Per token and layer the frozen linears cost 2·N_lin forward; causal attention costs
    4·d_attn·(i+1) for the token at position i (QKᵀ and AV). The LoRA branch of a d_in→d_out linear
    costs 2·r·(d_in + d_out). The backward of a frozen base needs only activation gradients
    (dX = dY·Wᵀ, 2× the forward), not weight gradients, so layers cost 3× their forward; the LoRA
    branch also needs its weight gradients (≈1× more). The LM head runs on completion positions
    only (2·D·V each way: logits, then dH; the tied embedding is frozen, so no dW).
    This is NOT 6·params·tokens: that formula assumes every weight gets a gradient.
    """
    D, I, L, V = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    d_q = m["num_attention_heads"] * m["head_dim"]
    d_kv = m["num_key_value_heads"] * m["head_dim"]
    linears = [
        (D, d_q),
        (D, d_kv),
        (D, d_kv),
        (d_q, D),
        (D, I),
        (D, I),
        (I, D),
    ]  # q k v o gate up down
    tokens = batch * input_len
    base = L * tokens * sum(2 * a * b for a, b in linears)
    lora = L * tokens * sum(2 * rank * (a + b) for a, b in linears)
    attention = L * batch * 4 * d_q * input_len * (input_len + 1) // 2
    head = batch * completion * 2 * D * V
    total = 3 * (base + attention) + 4 * lora + 2 * head
    return {
        "total": total,
        "forward": base + attention + lora + head,
        "head_share": 2 * head / total,
    }


def emit(record: dict, path: str | None) -> dict:
    """The record as one JSON line on stdout, and into `path` (--json) when given."""
    print(json.dumps(record))
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
    return record


def parser(doc: str, reps: int) -> argparse.ArgumentParser:
    """The options every side-by-side script takes: --quick, --reps, --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model: a smoke test in seconds")
    ap.add_argument("--reps", type=int, default=reps, help="timed repetitions")
    ap.add_argument("--json", help="also write the JSON record to this file")
    return ap


class NoTokenizer:
    """What batch_generate needs of a tokenizer, and no stop token: completions run to max_tokens."""

    eos_token_ids: list[int] = []

    def decode(self, ids):
        return ""
