"""The `tokenizer.*` metadata of a GGUF file: copied from the source GGUF, or described from a
Hugging Face byte-level BPE tokenizer the way llama.cpp's convert_hf_to_gguf.py does
(`_set_vocab_gpt2`: tokens by id padded with `[PAD{i}]`, token types, merges, special ids,
`add_bos_token`, the chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from mlx_sdft.errors import InputError
from mlx_sdft.formats.gguf_names import END_OF_TURN

# llama.cpp's pre-tokenizer names for the split rules it knows, recognised from the tokenizer's own
# regex (llama.cpp hashes a probe text instead; these are the ones the supported families use).
_GPT2_SPLIT = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel's own
)
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_TOKENIZERS = {
    _GPT2_SPLIT: "gpt2",
    _LLAMA3_SPLIT: "llama-bpe",
    _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
}


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> dict:
    """Copy every `tokenizer.*` key of `source` with its GGUF value types."""
    reader = gguf.GGUFReader(source)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            kind = field.types[0]
            meta[key] = field.contents()
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, meta[key], kind, sub_type=sub)
    if "tokenizer.ggml.tokens" not in meta:
        raise InputError(f"{source}: the file has no tokenizer (no tokenizer.ggml.tokens)")
    ids = [
        meta[f"tokenizer.ggml.{k}_token_id"]
        for k in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{k}_token_id" in meta
    ]
    return _facts(meta["tokenizer.ggml.tokens"], ids, meta.get("tokenizer.chat_template"))


def hf_tokenizer_fields(writer: gguf.GGUFWriter, hf, vocab_size: int, eos_ids) -> dict:
    """Describe the transformers tokenizer `hf` for llama.cpp; `vocab_size` is the embedding's rows."""
    pre = check_tokenizer(hf)
    spec = json.loads(hf.backend_tokenizer.to_str())
    vocab = hf.get_vocab()
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise InputError(
            f"the tokenizer has {len(vocab)} tokens but the model's embedding only {vocab_size} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t.special for i, t in hf.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(
            gguf.TokenType.UNUSED
            if i not in by_id
            else gguf.TokenType.NORMAL
            if i not in added
            else gguf.TokenType.CONTROL
            if added[i]
            else gguf.TokenType.USER_DEFINED
        )
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    )
    template = hf.chat_template if isinstance(hf.chat_template, str) else None
    end_of_turn = [vocab[t] for t in END_OF_TURN if t in vocab and template and t in template]
    eos = hf.eos_token_id if hf.eos_token_id is not None else min(eos_ids or (), default=None)
    special = {
        "bos": hf.bos_token_id,
        "eos": eos,
        "unk": hf.unk_token_id,
        "pad": hf.pad_token_id,
        "eot": end_of_turn[0] if end_of_turn else None,
    }
    for key, value in special.items():
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    probe = hf.encode("a")
    writer.add_add_bos_token(hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id])
    writer.add_add_eos_token(hf.eos_token_id is not None and probe[-1:] == [hf.eos_token_id])
    if template:
        writer.add_chat_template(template)
    return _facts(
        tokens, [i for i in (eos, *sorted(eos_ids or ()), *end_of_turn) if i is not None], template
    )


def check_tokenizer(hf) -> str:
    """llama.cpp's name for the split rule of the transformers tokenizer `hf` (see `_pre_tokenizer`);
    InputError when it is not a byte-level BPE tokenizer or its rule is not one named here."""
    spec = json.loads(hf.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise InputError(
            "the tokenizer is not a byte-level BPE one, the only kind written from a model folder "
            "(start from the model's GGUF file to keep another vocabulary)"
        )
    return _pre_tokenizer(spec.get("pre_tokenizer"))


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's split rule (`tokenizer.ggml.pre`): gpt2 for a plain
    byte-level one (GPT-2's regex, no prefix space), smollm for single digits before it, llama-bpe
    and qwen2 for their regexes. Any other rule is an InputError, as llama.cpp's converter refuses
    a pre-tokenizer it does not know: written as another, llama.cpp, Ollama and LM Studio would split
    text into other tokens than the model was trained on."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    byte_level = (
        steps[-1]
        if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space")
        else None
    )
    if byte_level is not None:
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt2"
        if kinds == ["Digits", "ByteLevel"] and regex and steps[0].get("individual_digits"):
            return "smollm"  # digits one by one, then GPT-2's rule (SmolLM, StarCoder)
        split = steps[0] if kinds == ["Split", "ByteLevel"] and not regex else {}
        pattern = (split.get("pattern") or {}).get("Regex")
        if (
            pattern in _PRE_TOKENIZERS
            and split.get("behavior", "Isolated") == "Isolated"
            and not split.get("invert")
        ):
            return _PRE_TOKENIZERS[pattern]
    shown = json.dumps(pre, ensure_ascii=False)
    raise InputError(
        f"the tokenizer's pre-tokenizer is not one this exporter can name for llama.cpp (gpt2, smollm, "
        f"llama-bpe, qwen2): {shown[:160] + '...' if len(shown) > 160 else shown}; written under another "
        "name, llama.cpp, Ollama and LM Studio would split text differently from training (start from "
        "the model's GGUF file as --model to keep its tokenizer)"
    )


def _facts(tokens: list[str], ids: list[int], template: str | None) -> dict:
    """The ids a generation ends on (as gguf_read counts them) and what the Modelfile needs."""
    in_template = [
        i for i, t in enumerate(tokens) if t in END_OF_TURN and (template is None or t in template)
    ]
    end_ids = list(dict.fromkeys(i for i in [*ids, *in_template] if 0 <= i < len(tokens)))
    return {"tokens": tokens, "end_ids": end_ids, "chat_template": template}
