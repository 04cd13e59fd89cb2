"""A tiny llama-type model and a byte-level BPE tokenizer with a ChatML template, built in-process
and saved as an mlx-lm model folder, so tests never download anything."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS_FILES = [
    "recipes/smoke/data/train.jsonl",
    "recipes/smoke/data/valid.jsonl",
    "recipes/continual/opposites/train.jsonl",
    "recipes/continual/opposites/test.jsonl",
]


def _corpus() -> list[str]:
    root = Path(__file__).resolve().parents[1]
    text = [line for f in _CORPUS_FILES for line in (root / f).read_text().splitlines()]
    return text + [
        "system user assistant",
        "This is an example for a response to the question:",
        "Now answer with a response of your own, including the thinking process.",
    ]


def build_tokenizer(
    folder: Path,
    chat_template: str | None = CHAT_TEMPLATE,
    vocab_size: int = 400,
    specials: list[str] = SPECIALS,
    eos_token: str = "<|im_end|>",
    bos_token: str | None = None,
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token=specials[0],
        bos_token=bos_token,
        unk_token=None,
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def build_model(
    folder: str | Path,
    seed: int = 0,
    chat_template: str | None = CHAT_TEMPLATE,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = True,
) -> Path:
    """Write a random tiny llama (2 blocks, hidden 64) and its tokenizer to `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, chat_template)
    config = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "tie_word_embeddings": tie,
        "rope_theta": 10000.0,
        "eos_token_id": tokenizer.eos_token_id,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
