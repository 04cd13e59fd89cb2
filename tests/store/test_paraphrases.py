"""A one-off lesson's prompt reworded by the model: which lines of its answer are rewordings, the
split into those trained on and those held out, and the examples they become."""

import pytest

from mlx_sdft.config.bundled import is_held_out
from mlx_sdft.core.prompts import encode_examples, student_text, teacher_text
from mlx_sdft.errors import InputError
from mlx_sdft.store import lessons, rules

TEMPLATE = "{question}\n\nExample answer: {demonstration}"


def test_paraphrases_are_the_list_lines_that_reword_the_prompt():
    prompt = "What is the capital of Australia?"
    text = (
        "Sure! Here are some ways to ask it:\n"
        "1. Which city is the capital of Australia?\n"
        "2) **What is Australia's capital city?**\n"
        "3. what is the capital of australia\n"  # the prompt itself, case and end aside
        "4. Which city is the capital of Australia ?\n"  # a repeat
        "- Name the capital of Australia.\n"
        f"5. {'Tell me the capital of Australia ' * 5}\n"  # longer than twice the prompt + 40
        "6. Canberra, since 1913.\n"  # an answer, naming no word of the prompt
        "7. \n"
        "Tell me, what is the capital of Australia?\n"
    )  # not a list item
    assert rules.paraphrases_in(text, prompt, 8) == [
        "Which city is the capital of Australia?",
        "What is Australia's capital city?",
        "Name the capital of Australia.",
    ]
    assert rules.paraphrases_in(text, prompt, 2) == [
        "Which city is the capital of Australia?",
        "What is Australia's capital city?",
    ]
    # a prompt with no word of 4 letters or more keeps any rewording
    assert rules.paraphrases_in("1. Say red please.\n2. Say red.", "Say red.", 8) == [
        "Say red please."
    ]
    assert rules.paraphrases_in("", prompt, 8) == []


def _row(paraphrases, kind="demonstration"):
    row = {
        "id": 7,
        "state": "new",
        "kind": kind,
        "tools": None,
        "text": "Canberra.",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of Australia?"},
        ],
        "preflight": {"paraphrases": paraphrases},
    }
    if kind == "feedback":
        row.update(
            answer="Sydney.",
            teacher_template="{question}\nYou said: {answer}\nFeedback: {feedback}",
            text="wrong city: it is Canberra",
        )
    return row


def test_the_split_is_disjoint_stable_and_holds_one_out():
    texts = [f"Australia capital question, wording {i}?" for i in range(12)]
    train, held_out = lessons.paraphrased(_row(texts), 12)

    def asked(part):
        return [ex.prompt[-1]["content"] for ex in part]

    assert held_out and train and not set(asked(train)) & set(asked(held_out))
    assert sorted(asked(train) + asked(held_out)) == sorted(texts)
    # by each text's own hash: the same side in any order and whatever else was written
    assert set(asked(held_out)) == {t for t in texts if is_held_out(t)} != set()
    some = texts[::-1][:9]
    assert (
        set(asked(lessons.paraphrased(_row(some), 12)[1]))
        == {t for t in some if is_held_out(t)}
        != set()
    )
    # two rewordings, neither held out by its hash: the last one is
    pair = [t for t in texts if not is_held_out(t)][:2]
    assert [asked(p) for p in lessons.paraphrased(_row(pair), 8)] == [pair[:1], pair[1:]]
    assert lessons.paraphrased(_row(texts), 0) == ([], [])  # --lesson-paraphrases 0
    assert sum(map(len, lessons.paraphrased(_row(texts), 5))) == 5  # the first n only
    assert lessons.paraphrased({**_row(texts), "preflight": None}, 8) == ([], [])


def test_a_paraphrase_of_a_demonstration_shows_it_to_the_teacher_without_an_sft_target(tiny):
    _, tokenizer = tiny
    row = _row(["Which city is the capital of Australia?", "Australia's capital is which city?"])
    train, held_out = lessons.paraphrased(row, 8)
    example = lessons.shown_not_taught(train[0], TEMPLATE)
    assert (
        example.prompt[0] == row["prompt"][0]
        and example.prompt[-1]["content"] in row["preflight"]["paraphrases"]
    )
    assert example.where.startswith("store:lesson/7/paraphrase/")
    student, teacher = (
        student_text(tokenizer, example),
        teacher_text(tokenizer, example, "{question}"),
    )
    assert example.prompt[-1]["content"] in student and "Canberra" not in student
    assert (
        f"{example.prompt[-1]['content']}\n\nExample answer: Canberra." in teacher
        and "Be brief." in teacher
    )
    own, reworded = encode_examples(tokenizer, [lessons.to_example(row), example], TEMPLATE, 512)
    assert (
        own.demonstrated and not reworded.demonstrated
    )  # the SFT term: the lesson's own prompt only
    assert (
        held_out[0].demonstration == "Canberra."
    )  # the gate measures the demonstration after the rewording


def test_a_paraphrase_of_a_feedback_lesson_keeps_its_feedback_for_the_teacher(tiny):
    _, tokenizer = tiny
    row = _row(
        ["Which city is the capital of Australia?", "Australia's capital is which city?"],
        "feedback",
    )
    example = lessons.shown_not_taught(lessons.paraphrased(row, 8)[0][0], TEMPLATE)
    assert example == lessons.paraphrased(row, 8)[0][0]  # no demonstration to move
    teacher = teacher_text(tokenizer, example, TEMPLATE)
    assert (
        f"{example.prompt[-1]['content']}\nYou said: Sydney.\nFeedback: wrong city: it is Canberra"
        in teacher
    )
    assert "Feedback" not in student_text(tokenizer, example)


def test_an_error_about_a_paraphrase_names_its_lesson_and_the_command_that_removes_it():
    error = lessons.removable(InputError("store:lesson/7/paraphrase/3: the prompt is 900 tokens"))
    assert str(error).startswith(
        "lesson 7: the prompt is 900 tokens"
    ) and "lessons delete 7" in str(error)


@pytest.mark.parametrize("n", [-1, 33])
def test_lesson_paraphrases_out_of_range_is_refused(n):
    from mlx_sdft.config import LearnConfig

    with pytest.raises(InputError, match="--lesson-paraphrases"):
        LearnConfig(lesson_paraphrases=n).validate()


def test_an_answer_cut_off_loses_its_last_line(monkeypatch):
    """The last rewording of an answer that ran out of tokens may stop mid-sentence: it is left out;
    in a whole answer it is kept."""
    from mlx_sdft.measure import rules as measure_rules

    text = "1. Which city is the capital of Australia?\n2. What is the capital city of Aus"
    for truncated, kept in ((True, 1), (False, 2)):
        monkeypatch.setattr(
            measure_rules,
            "greedy",
            lambda *a, t=truncated, **k: measure_rules.Answers([text], [[]], [t], [[]]),
        )
        got = measure_rules.write_paraphrases(
            None, None, "What is the capital of Australia?", 8, 32
        )
        assert (
            got
            == ["Which city is the capital of Australia?", "What is the capital city of Aus"][:kept]
        )


def test_a_question_list_cut_off_loses_its_last_line_and_a_cut_single_line_is_dropped(monkeypatch):
    """Questions about a fact are read the same way: a question cut at the token budget may end in a
    "?" the model had not reached (here "Biscuit?" of "Biscuit's breed?"); a lone cut line is no line."""
    from mlx_sdft.measure import rules as measure_rules

    fact = "The user's dog is called Biscuit."
    for text, truncated, want in (
        ("1. What is the name of the user's dog?\n2. Is the dog Biscuit?", True, 1),
        ("1. What is the name of the user's dog?\n2. Is the dog Biscuit?", False, 2),
        ("1. What is the name of the user's dog?", True, 0),
    ):
        monkeypatch.setattr(
            measure_rules,
            "greedy",
            lambda *a, x=text, t=truncated, **k: measure_rules.Answers([x], [[]], [t], [[]]),
        )
        got = measure_rules.write_questions(None, None, fact, 12, 32)
        assert len(got) == want, (text, truncated, got)
