"""`learn --written-prompts N`: the model writes new requests on the subjects of the user's stored
ones (scripted here: the random tiny model writes no list), and the rules are distilled over them
too; never over a held-out prompt, and the texts are not kept."""

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.config import LearnConfig
from mlx_sdft.config.bundled import prompt_pool
from mlx_sdft.errors import InputError
from mlx_sdft.store import versions
from mlx_sdft.store.db import Store
from mlx_sdft.store.rules import requests_in
from test_rules import FAST, LOOSE, RULE
from test_store import _exchange

runner = CliRunner()
# the fast, loose learn of the rules tests (any gain passes gate 1)
LEARN = (*FAST, *LOOSE, "--gate-min-gain", "-1000")
# the second is held out (by its hash): never shown as an example, never trained on
ASKED = [
    "How do I boil an egg?",
    "What is the tallest mountain in Europe?",
    "Give me a name for a cat.",
]
NEW = ["Quizzical: how long should an egg boil?", "Quizzical: which Alp is the highest?"]
HELD_OUT = prompt_pool()[1][0][-1]["content"]  # the gate's first held-out prompt


@pytest.fixture
def scripted(monkeypatch):
    """The model's answer to the request for new requests: a numbered list that repeats what it was
    shown, a held-out stored request and a held-out bundled prompt before NEW. Yields the requests made."""
    from mlx_sdft.measure import rules as measure_rules

    asked, real = [], measure_rules.greedy

    def greedy(model, tokenizer, prompts, *args, **kwargs):
        if (
            len(prompts) == 1
            and "other questions on the same subjects" in prompts[0][-1]["content"]
        ):
            asked.append(prompts[0][-1]["content"])
            lines = [*ASKED, HELD_OUT.upper(), *NEW]
            text = "\n".join(f"{i + 1}. {line}" for i, line in enumerate(lines))
            return measure_rules.Answers([text], [[]], [False], [[]])
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(measure_rules, "greedy", greedy)
    return asked


def _home(tmp_path, asked=ASKED):
    home = tmp_path / "home"
    with Store(home) as store:
        for text in asked:
            _exchange(store, [{"role": "user", "content": text}], "An answer.")
        store.add_lesson(kind="rule", text=RULE)
    return home


def _learn(home, model, *extra):
    return runner.invoke(app, ["learn", "--home", str(home), "--model", str(model), *LEARN, *extra])


def test_the_rules_are_distilled_over_the_new_requests_the_model_writes(
    tiny_model, tmp_path, follows_when_told, scripted, trained
):
    home = _home(tmp_path)
    result = _learn(home, tiny_model, "--written-prompts", "4")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "the model writes 4 new requests like 2 stored ones" in said
    assert "2 new requests written" in said
    [request] = scripted
    assert f"- {ASKED[0]}" in request and f"- {ASKED[2]}" in request and ASKED[1] not in request
    assert "Write 4 other questions" in request
    [examples] = trained
    prompts = [ex.prompt[-1]["content"] for ex in examples]
    assert all(p in prompts for p in NEW)  # not what it was shown again, nor a held-out prompt
    assert not {HELD_OUT, HELD_OUT.upper(), ASKED[1]} & set(prompts)
    assert all(ex.teacher_system and RULE in ex.teacher_system for ex in examples)
    assert versions.record(home, 1)["written_prompts"] == 2
    for path in home.rglob("*"):  # counted, not kept
        if path.is_file():
            assert b"Quizzical" not in path.read_bytes(), path


def test_by_default_the_model_writes_no_requests(
    tiny_model, tmp_path, follows_when_told, scripted, trained
):
    home = _home(tmp_path)
    assert _learn(home, tiny_model).exit_code == 0
    assert scripted == [] and versions.record(home, 1)["written_prompts"] == 0
    assert not any("Quizzical" in ex.prompt[-1]["content"] for ex in trained[0])


def test_without_stored_requests_nothing_is_written(
    tiny_model, tmp_path, follows_when_told, scripted
):
    result = _learn(_home(tmp_path, asked=[]), tiny_model, "--written-prompts", "4")
    assert result.exit_code == 0, result.output
    assert "no stored one-line requests to write new ones like" in " ".join(result.output.split())
    assert scripted == []


def test_new_requests_are_the_listed_lines_unlike_the_known_ones():
    text = (
        "Here are some:\n"
        "1. How do I boil an egg?\n"  # shown: not new
        "2. how do I boil an EGG\n"  # the same, case and end punctuation aside
        "3. **Which Alp is the highest?**\n"
        "4. Which Alp is the highest?\n"  # a repeat
        f"5. {'very ' * 80}long\n"
        "Not a list line?\n"
        "- What is a soft-boiled egg?"
    )
    assert requests_in(text, ["How do I boil an egg?"], 5) == [
        "Which Alp is the highest?",
        "What is a soft-boiled egg?",
    ]
    assert requests_in(text, [], 1) == ["How do I boil an egg?"]


@pytest.mark.parametrize("n", [-1, 33])
def test_written_prompts_out_of_range_is_refused(n):
    with pytest.raises(InputError, match="--written-prompts"):
        LearnConfig(written_prompts=n).validate()
