"""A model opened the one way every command opens it, from the command's resolved options: the
folder and tokenizer as --model, --chat-template and --dequantize say, a tokenizer without a chat
template refused before any weights load (`open_tokenizer_for`); then, on the command's console,
the BLAS warning and the system-prompt note, and the weights with their adapters (`open_model_for`).

Above core, formats and machine, which it joins: formats opens the files, core.prompts says which
system prompt the prompts get, machine.blas whether the CPU's matmuls will be slow.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_sdft.chat_template import render
from mlx_sdft.core.prompts import system_prompt_note
from mlx_sdft.formats import models
from mlx_sdft.machine.blas import warn


def open_tokenizer_for(options) -> tuple[Path, object]:
    """The model's folder and tokenizer as `options` say (formats.models.open_tokenizer): --model,
    --chat-template and --dequantize; options without the last two open the model's own template and
    a GGUF file's weights as the device prefers. No chat template: the one-line InputError of every
    command, here, before any weights load."""
    path, tokenizer = models.open_tokenizer(
        options.model,
        chat_template=getattr(options, "chat_template", None),
        dequantize=getattr(options, "dequantize", None),
    )
    render(tokenizer, [{"role": "user", "content": "hi"}])
    return path, tokenizer


def open_model_for(
    options,
    *,
    adapters=None,
    console=None,
    note: bool = False,
    opened: tuple[Path, object] | None = None,
) -> tuple:
    """(model, tokenizer, base) as `options` say: `open_tokenizer_for`; then on `console` (None:
    nothing printed) the BLAS warning and, with `note`, the system prompt the prompts get
    (--system-prompt's or the template's own); then the weights, with `adapters` (an adapter folder,
    or `Adapters` to train) attached: see formats.models.open_model for `base`.
    `opened`: what `open_tokenizer_for(options)` already gave a command that checks its input
    against the tokenizer before any weights load."""
    path, tokenizer = opened or open_tokenizer_for(options)
    if console is not None:
        warn(console)
        line = (
            system_prompt_note(tokenizer, getattr(options, "system_prompt", None)) if note else None
        )
        if line:
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    model, base = models.open_model(path, adapters=adapters)
    return model, tokenizer, base


def open_to_train(cfg, opened: tuple | None = None) -> tuple:
    """(model_path, tokenizer, model, base) as a run trains them: the RNG seeded with --seed, then the
    weights with the adapters of the run attached (fresh LoRA from that seed, or --resume-adapter-file)."""
    model_path, tokenizer = opened or open_tokenizer_for(cfg)
    mx.random.seed(cfg.seed)
    adapters = models.Adapters(
        cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters, cfg.resume_adapter_file
    )
    model, _, base = open_model_for(cfg, adapters=adapters, opened=(model_path, tokenizer))
    return model_path, tokenizer, model, base
