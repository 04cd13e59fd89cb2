"""Fold adapters into their base weights: the plain float model that other tools read."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.utils import dequantize_model


def fuse_adapters(model: nn.Module) -> nn.Module:
    """`model` with every LoRA/DoRA layer replaced by mlx-lm's `fuse()` of it (W + scale·Bᵀ·Aᵀ, DoRA's
    magnitude applied) and every quantized layer dequantized, in place. The weights keep their dtype
    (float32 for a GGUF on the CPU); a quantized base is dequantized before the adapters are added,
    so nothing is requantized here."""
    fused = [
        (name, m.fuse(dequantize=True)) for name, m in model.named_modules() if hasattr(m, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model = dequantize_model(model)
    mx.eval(model.parameters())
    return model
