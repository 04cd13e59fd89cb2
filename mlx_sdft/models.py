"""Load a model and its tokenizer (hub id or local folder) and attach trainable adapters.

The tokenizer loads first and separately, so prompts can be checked before any weights load.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import _download, load_config, load_model
from mlx_lm.utils import load_tokenizer as _load_tokenizer

from mlx_sdft.config import Config
from mlx_sdft.errors import InputError
from mlx_sdft.teacher import Leaves, copy_leaves, trainable_leaves


def resolve(model: str) -> Path:
    """A local folder as it is, else a hub id (downloaded once into the HF cache)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"{model}: not a model folder (no config.json)")
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise InputError(f"{model}: no such model folder (and not a hub id like org/name)")
    try:
        return _download(model)
    except Exception as e:  # offline, unknown repo, gated: all end the run the same way
        raise InputError(f"{model}: could not get the model from the hub ({type(e).__name__}: {e})".splitlines()[0]) from None


def load_tokenizer(model_path: Path, chat_template: str | None = None):
    extra = {"chat_template": chat_template} if chat_template else None
    eos = load_config(model_path).get("eos_token_id")
    return _load_tokenizer(model_path, extra, eos_token_ids=eos)


def load(model_path: Path) -> nn.Module:
    model, _ = load_model(model_path)
    return model


def attach_adapters(model: nn.Module, cfg: Config) -> Leaves:
    """Freeze the model and make the chosen layers trainable, as mlx_lm.lora does.

    Returns the trainable leaves before any training (the `base` teacher), taken before
    --resume-adapter-file loads so that `base` always means "adapters off".
    """
    num_blocks = len(model.layers)
    if cfg.num_layers > num_blocks:
        raise InputError(f"--num-layers: {cfg.num_layers} but the model has {num_blocks} blocks")
    model.freeze()
    if cfg.fine_tune_type == "full":
        for block in model.layers[-max(cfg.num_layers, 0):]:
            block.unfreeze()
    else:
        linear_to_lora_layers(model, cfg.num_layers, cfg.lora_parameters, use_dora=cfg.fine_tune_type == "dora")
    base = copy_leaves(trainable_leaves(model))
    if cfg.resume_adapter_file:
        path = Path(cfg.resume_adapter_file)
        if not path.is_file():
            raise InputError(f"--resume-adapter-file: {path}: no such file")
        model.load_weights(str(path), strict=False)
    mx.eval(model.parameters())
    return base
