"""`learn` rewords each new one-off lesson's prompt with the model it is training (scripted here:
the random tiny model writes no list), trains on the lesson over those rewordings, measures it on
the held-out ones, keeps them with the lesson for the next learn, and forget takes them away."""

import pytest
from typer.testing import CliRunner

from mlx_sdft.cli import app
from mlx_sdft.config.bundled import is_held_out
from mlx_sdft.store import versions
from mlx_sdft.store.db import Store
from test_learn import SMALL

runner = CliRunner()
FAST = (
    *SMALL,
    "--iters",
    "2",
    "--gate-max-kl-rise",
    "100",
    "--gate-max-loop-rise",
    "1",
    "--gate-max-prior-drop",
    "1",
    "--gate-tolerance",
    "100",
    "--gate-min-gain",
    "-1000",
    "--lesson-paraphrases",
    "8",
)
PROMPT = "What is the capital city of Australia?"
WRITTEN = [f"Quizzical wording {i}: which city is the capital of Australia?" for i in range(12)]
HELD = [t for t in WRITTEN[:8] if is_held_out(t)]
TRAIN = [t for t in WRITTEN[:8] if t not in HELD]


@pytest.fixture
def scripted(monkeypatch):
    """The model's answer to the request for rewordings: WRITTEN as a numbered list (after a line
    that is not one, and with the prompt itself among them); every other answer the model's own.
    Yields the rewording requests made."""
    from mlx_sdft.measure import rules as measure_rules

    asked, real = [], measure_rules.greedy

    def greedy(model, tokenizer, prompts, *args, **kwargs):
        if len(prompts) == 1 and prompts[0][-1]["content"].startswith("Reword this request"):
            asked.append(prompts[0][-1]["content"])
            lines = [
                "Here they are:",
                f"1. {PROMPT}",
                *(f"{i + 2}. {t}" for i, t in enumerate(WRITTEN)),
            ]
            return measure_rules.Answers(["\n".join(lines)], [[]], [False], [[]])
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(measure_rules, "greedy", greedy)
    return asked


def _learn(home, model, *extra):
    return runner.invoke(app, ["learn", "--home", str(home), "--model", str(model), *FAST, *extra])


def _lesson(home, kind="demonstration") -> int:
    with Store(home) as store:
        if kind == "feedback":
            return store.add_lesson(
                kind="feedback",
                prompt=[{"role": "user", "content": PROMPT}],
                answer="Sydney.",
                text="wrong city",
                teacher_template="{question} | {answer} | {feedback}",
            )
        return store.add_lesson(
            kind="demonstration", prompt=[{"role": "user", "content": PROMPT}], text="Canberra."
        )


def test_learn_trains_on_the_rewordings_and_measures_the_held_out_ones(
    tiny_model, tmp_path, scripted, trained
):
    assert HELD and TRAIN  # the split of the first 8 holds some out by hash
    home = tmp_path / "home"
    lesson = _lesson(home)
    result = _learn(home, tiny_model, "--method", "sdft")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert said.index(f"lesson {lesson}: the model rewords its prompt") < said.index(
        f"lesson {lesson}: 8 paraphrases of its prompt, {len(TRAIN)} to train on and {len(HELD)} held out"
    )
    assert (
        len(scripted) == 1 and PROMPT in scripted[0] and "Reword this request 8 ways" in scripted[0]
    )
    with Store(home) as store:
        kept = store.lesson(lesson)["preflight"]
    assert kept == {
        "paraphrases": WRITTEN[:8],
        "paraphrases_asked": 8,
    }  # not the prompt itself, at most 8

    [examples] = trained
    assert [ex.prompt[-1]["content"] for ex in examples] == [PROMPT, *TRAIN]  # never a held-out one
    own, *reworded = examples
    assert own.demonstration == "Canberra." and own.teacher_template is None
    for ex in reworded:  # the teacher is shown the demonstration; no SFT target of their own
        assert ex.demonstration == "" and ex.context == {"demonstration": "Canberra."}
        assert ex.teacher_template == versions.record(home, 1)["options"]["teacher_template"]
    held = versions.record(home, 1)["gate"]["new_lessons"]["held_out_paraphrases"]
    assert held["lessons"] == 1 and held["prompts"] == len(HELD)
    assert held["change"] == pytest.approx(held["candidate"] - held["current"])
    assert held["per_lesson"][str(lesson)] == [held["current"], held["candidate"]]

    # a re-run (the lesson new again) reuses them: nothing is asked of the model
    assert runner.invoke(app, ["rollback", "--home", str(home), "0"]).exit_code == 0
    again = _learn(home, tiny_model, "--method", "sdft")
    assert (
        again.exit_code == 0
        and "8 paraphrases of its prompt, written by an earlier learn" in again.output
    )
    assert len(scripted) == 1 and [ex.prompt[-1]["content"] for ex in trained[1]] == [
        PROMPT,
        *TRAIN,
    ]
    # asked for more than were asked for before: the model writes again
    assert (
        _learn(home, tiny_model, "--method", "sdft", "--lesson-paraphrases", "12").exit_code == 2
    )  # nothing new
    assert runner.invoke(app, ["rollback", "--home", str(home), "0"]).exit_code == 0
    assert _learn(home, tiny_model, "--method", "sdft", "--lesson-paraphrases", "12").exit_code == 0
    assert len(scripted) == 2 and "Reword this request 12 ways" in scripted[1]

    # forget: the rewordings leave the store and every file of the home
    assert runner.invoke(app, ["forget", "--home", str(home), str(lesson)]).exit_code == 0
    with Store(home) as store:
        assert store.lesson(lesson)["preflight"] is None
    for path in home.rglob("*"):
        if path.is_file():
            assert b"Quizzical" not in path.read_bytes(), path


def test_a_feedback_lesson_trains_on_its_rewordings_with_its_feedback(
    tiny_model, tmp_path, scripted, trained
):
    home = tmp_path / "home"
    _lesson(home, "feedback")
    result = _learn(home, tiny_model, "--method", "sdft")
    assert result.exit_code == 0, result.output
    own, *reworded = trained[0]
    assert [ex.prompt[-1]["content"] for ex in reworded] == TRAIN
    for ex in reworded:
        assert ex.demonstration == "" and ex.context == own.context == {
            "answer": "Sydney.",
            "feedback": "wrong city",
        }
        assert ex.teacher_template == own.teacher_template
    assert versions.record(home, 1)["gate"]["new_lessons"]["held_out_paraphrases"][
        "prompts"
    ] == len(HELD)


def test_by_default_a_lesson_trains_on_its_own_prompt_only(tiny_model, tmp_path, scripted, trained):
    home = tmp_path / "home"
    lesson = _lesson(home)
    assert FAST[-2:] == ("--lesson-paraphrases", "8")
    result = runner.invoke(
        app,
        ["learn", "--home", str(home), "--model", str(tiny_model), *FAST[:-2], "--method", "sdft"],
    )
    assert result.exit_code == 0, result.output
    assert (
        scripted == [] and "rewords" not in result.output and "of its prompt" not in result.output
    )
    assert [ex.prompt[-1]["content"] for ex in trained[0]] == [PROMPT]
    assert "held_out_paraphrases" not in versions.record(home, 1)["gate"]["new_lessons"]
    with Store(home) as store:
        assert store.lesson(lesson)["preflight"] is None


def test_with_method_sft_the_rewordings_are_measured_not_trained_on(
    tiny_model, tmp_path, scripted, trained
):
    home = tmp_path / "home"
    _lesson(home)
    result = _learn(home, tiny_model, "--method", "sft")
    assert result.exit_code == 0, result.output
    assert [ex.prompt[-1]["content"] for ex in trained[0]] == [
        PROMPT
    ]  # SFT: no demonstration of their own
    assert versions.record(home, 1)["gate"]["new_lessons"]["held_out_paraphrases"][
        "prompts"
    ] == len(HELD)
