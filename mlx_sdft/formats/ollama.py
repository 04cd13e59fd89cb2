"""An Ollama `Modelfile` for an exported GGUF: FROM, a TEMPLATE in Ollama's Go-template syntax
for the chat formats we recognise in the Jinja chat template, and the stop tokens.

    ollama create my-model -f Modelfile && ollama run my-model
"""

from __future__ import annotations

import re

# Recognised by a token only that format uses; each is the format's usual Ollama template
# (a system message, one user turn, then the assistant's answer closed by its end token).
_TEMPLATES = {
    "<|im_start|>": (  # ChatML: Qwen, SmolLM, many fine-tunes
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
    ),
    "<|start_header_id|>": (  # Llama 3
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
    ),
    "<start_of_turn>": (  # Gemma: no system role, so the system text opens the user turn
        "<start_of_turn>user\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}<end_of_turn>\n"
        "<start_of_turn>model\n{{ .Response }}<end_of_turn>\n"
    ),
}

# The system turn of each format, to find the system prompt a template adds by itself (SmolLM2's
# "You are a helpful AI assistant named SmolLM..."), which Ollama's TEMPLATE above would drop.
_SYSTEM_TURN = {
    "<|im_start|>": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
    "<|start_header_id|>": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>",
}


def chat_format(chat_template: str | None) -> str | None:
    """The marker token of the recognised chat format in a Jinja chat template, else None."""
    return next(
        (marker for marker in _TEMPLATES if chat_template and marker in chat_template), None
    )


def modelfile(
    gguf_file: str, chat_template: str | None, stop_tokens: list[str], rendered: str | None = None
) -> str:
    """The Modelfile text; `gguf_file` relative to the Modelfile's folder. `rendered`: the chat
    template applied to one user message, whose system turn (if the template adds one) becomes SYSTEM."""
    lines = ["# ollama create NAME -f Modelfile && ollama run NAME", f"FROM ./{gguf_file}"]
    marker = chat_format(chat_template)
    if marker:
        lines.append(f'TEMPLATE """{_TEMPLATES[marker]}"""')
        system = (
            re.search(_SYSTEM_TURN[marker], rendered or "", re.DOTALL)
            if marker in _SYSTEM_TURN
            else None
        )
        if system and system.group(1).strip():
            lines.append(f'SYSTEM """{system.group(1)}"""')
    else:  # Ollama then falls back to the chat template it finds inside the GGUF, if it knows it
        lines.append("# no TEMPLATE: the chat template is not ChatML, Llama 3 or Gemma")
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"
