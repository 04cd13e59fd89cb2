"""mlx-lm LoRA/DoRA adapters as a Hugging Face PEFT adapter folder (`adapter_model.safetensors`
+ `adapter_config.json`), which `PeftModel.from_pretrained(base, folder)` loads.

The same update in PEFT's terms (peft/tuners/lora/layer.py): mlx-lm computes
`y = x Wᵀ + scale · (x A) B` with A = `lora_a` [in, r] and B = `lora_b` [r, out]; PEFT computes
`y = x Wᵀ + (alpha / r) · x Aᵀ Bᵀ` with `lora_A.weight` [r, in] and `lora_B.weight` [out, r].
So `lora_A.weight = lora_aᵀ`, `lora_B.weight = lora_bᵀ` and `lora_alpha = scale · r`. DoRA's
magnitude `m` [out] is PEFT's `lora_magnitude_vector` (both divide by the row norms of W + ΔW).
Module paths stay as they are: mlx-lm's `model.layers.3.self_attn.q_proj` is the Hugging Face
one, under PEFT's `base_model.model.` prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from mlx_sdft.errors import InputError

PREFIX = "base_model.model."


def peft_tensors(model: nn.Module) -> tuple[dict[str, np.ndarray], dict]:
    """PEFT's tensors and the LoRA facts of the adapted `model`: {"r", "scale", "dora", "targets", "layers"}.

    Raises InputError for adapters PEFT's LoRA cannot express: embedding or MoE (SwitchLinear)
    adapters, ranks or scales that differ between layers, or no adapter layers at all."""
    tensors, ranks, scales, targets, layers, dora = {}, set(), set(), set(), set(), set()
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            key = f"{PREFIX}{name}"
            tensors[f"{key}.lora_A.weight"] = _numpy(module.lora_a.T)
            tensors[f"{key}.lora_B.weight"] = _numpy(module.lora_b.T)
            if isinstance(module, DoRALinear):
                tensors[f"{key}.lora_magnitude_vector"] = _numpy(module.m)
            ranks.add(module.lora_a.shape[1])
            scales.add(float(module.scale))
            dora.add(isinstance(module, DoRALinear))
            block, path = name.removeprefix("model.layers.").split(".", 1)
            targets.add(path)
            layers.add(int(block))
        elif hasattr(module, "lora_a") or hasattr(module, "lora_b"):
            raise InputError(
                f"{name}: a {type(module).__name__} adapter has no PEFT LoRA counterpart "
                "(PEFT export covers LoRA and DoRA on linear layers)"
            )
    if not tensors:
        raise InputError(
            "no LoRA or DoRA layers to export (a full fine-tune has no PEFT adapter; "
            "export it with --format gguf or mlx)"
        )
    if len(ranks) > 1 or len(scales) > 1:
        raise InputError(
            f"ranks {sorted(ranks)} and scales {sorted(scales)} differ between layers; "
            "the PEFT export writes one r and one lora_alpha"
        )
    facts = {
        "r": ranks.pop(),
        "scale": scales.pop(),
        "dora": dora.pop(),
        "targets": sorted(targets),
        "layers": sorted(layers),
    }
    return tensors, facts


def _numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))  # numpy has no bfloat16


def peft_config(facts: dict, base_model: str, dropout: float = 0.0) -> dict:
    """PEFT's `LoraConfig` as `adapter_config.json` holds it."""
    alpha = facts["scale"] * facts["r"]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": facts["r"],
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": facts["targets"],
        "layers_to_transform": facts["layers"],
        "layers_pattern": "layers",
        "use_dora": facts["dora"],
        "use_rslora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_peft(model: nn.Module, folder: str | Path, base_model: str, dropout: float = 0.0) -> dict:
    """Write the PEFT folder for the adapters in `model`; returns its adapter_config dict."""
    tensors, facts = peft_tensors(model)
    config = peft_config(facts, base_model, dropout)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # "format": "pt" is the metadata transformers and PEFT write (and some loaders check)
    mx.save_safetensors(
        str(folder / "adapter_model.safetensors"),
        {k: mx.array(v) for k, v in tensors.items()},
        metadata={"format": "pt"},
    )
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return config
