"""The Ollama Modelfile beside an exported GGUF: its TEMPLATE renders a conversation exactly as the
model's Jinja chat template does (ChatML, Llama 3, Gemma), and a system prompt the template adds by
itself is kept as SYSTEM."""

from __future__ import annotations

import re

import pytest
from jinja2 import Template
from tiny import CHAT_TEMPLATE

from mlx_sdft.formats.ollama import modelfile


LLAMA3 = (
    "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}{{ '<start_of_turn>' + role "
    "+ '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SMOLLM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def go_render(template: str, **values) -> str:
    """Ollama's Go template for the two constructs our TEMPLATEs use: {{ if .X }}…{{ end }} and {{ .X }}."""
    template = re.sub(
        r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}",
        lambda m: m[2] if values.get(m[1]) else "",
        template,
        flags=re.S,
    )
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values.get(m[1], ""), template)


@pytest.mark.parametrize(
    "chat_template,system", [(CHAT_TEMPLATE, "Be brief."), (LLAMA3, "Be brief."), (GEMMA, "")]
)
def test_modelfile_template_renders_as_the_chat_template(chat_template, system):
    text = modelfile("m.gguf", chat_template, ["<|im_end|>", "<|eot_id|>"])
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S)[1]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
    ]
    want = Template(chat_template).render(messages=messages, add_generation_prompt=False)
    assert go_render(template, System=system, Prompt="What is 2 + 2?", Response="4.") == want
    assert text.count("PARAMETER stop") == 2 and "SYSTEM" not in text


def test_modelfile_keeps_the_system_prompt_a_template_adds():
    rendered = Template(SMOLLM).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert 'SYSTEM """You are SmolLM."""' in modelfile("m.gguf", SMOLLM, ["<|im_end|>"], rendered)
    assert 'TEMPLATE """' not in modelfile("m.gguf", "{{ messages }}", [])
