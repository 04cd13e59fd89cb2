"""retention-small's data, files only, no model: the two-skill continual recipe (continual/) and the
learning-rate validation set (lr_valid.jsonl).

Both skills are scored on test sets of the same size, by the stage's regex metric, on questions
whose subject (country, word, thing, animal, singular) never appears in their train or valid split.
The learning rate is chosen on lr_valid.jsonl, whose questions share no prompt or subject with
data/train.jsonl or data/test.jsonl."""

import re
from pathlib import Path

import pytest

from mlx_sdft.core.data import load_dataset, load_examples
from mlx_sdft.core.metrics import extract, resolve_metric
from mlx_sdft.yaml_file import read_yaml

RETENTION = Path(__file__).resolve().parents[2] / "recipes" / "retention-small"
RECIPE = RETENTION / "continual"
LR_VALID = RETENTION / "lr_valid.jsonl"
BOLD_SPAN = re.compile(r"\*\*(.+?)\*\*")  # run.py's new-skill metric reads this span
STAGES = {stage["name"]: stage for stage in read_yaml(RECIPE / "stages.yaml")["stages"]}
# One pattern per question family; group 1 is the subject the answer is about.
FAMILIES = {
    "capital": re.compile(r"What is the capital of (?:the )?(.+)\?"),
    "opposite": re.compile(r'What is the opposite of "(.+)"\?'),
    "color": re.compile(r"What color is (?:an? )?(.+)\?"),
    "sound": re.compile(r"What sound does an? (.+) make\?"),
    "plural": re.compile(r'What is the plural of "(.+)"\?'),
}
SKILL_FAMILIES = {"bold": {"capital", "opposite"}, "brackets": {"color", "sound", "plural"}}


def _splits(name: str) -> dict:
    return load_dataset(RECIPE / STAGES[name]["data"])


def _question(example) -> str:
    return example.prompt[-1]["content"]


def _family(question: str) -> tuple[str, str]:
    hits = [
        (family, m.group(1).lower())
        for family, m in ((f, p.fullmatch(question)) for f, p in FAMILIES.items())
        if m
    ]
    assert len(hits) == 1, f"{question!r} matches families {hits}"
    return hits[0]


def test_both_skills_have_equal_splits_of_useful_size():
    sizes = {name: {split: len(rows) for split, rows in _splits(name).items()} for name in STAGES}
    assert set(sizes) == set(SKILL_FAMILIES)
    assert sizes["bold"] == sizes["brackets"], sizes
    assert sizes["bold"]["test"] >= 40 and sizes["bold"]["train"] == 32, sizes


@pytest.mark.parametrize("name", sorted(SKILL_FAMILIES))
def test_every_demonstration_holds_one_answer_span_the_metric_reads(name):
    pattern = re.compile(STAGES[name]["answer_regex"])
    metric = resolve_metric(STAGES[name]["metric"], STAGES[name]["answer_regex"])
    for split, rows in _splits(name).items():
        for ex in rows:
            answers = pattern.findall(ex.demonstration)
            assert len(answers) == 1 and answers[0].strip() == answers[0] != "", (ex.where, answers)
            assert metric(ex.demonstration, ex.demonstration) == 1.0
            # The score reads only the span: the same sentence with another answer scores 0.
            wrong = ex.demonstration.replace(answers[0], "zzz")
            assert metric(wrong, ex.demonstration) == 0.0, ex.where
            assert extract(pattern, ex.demonstration) == answers[0]


@pytest.mark.parametrize("name", sorted(SKILL_FAMILIES))
def test_test_questions_share_no_subject_with_train_or_valid(name):
    splits = _splits(name)
    seen = [ex for split in ("train", "valid") for ex in splits[split]]
    test = splits["test"]
    families = {_family(_question(ex))[0] for ex in test}
    assert families == SKILL_FAMILIES[name] == {_family(_question(ex))[0] for ex in splits["train"]}
    questions = [" ".join(_question(ex).lower().split()) for ex in test]
    assert len(set(questions)) == len(questions), "a test question is repeated"
    assert not set(questions) & {" ".join(_question(ex).lower().split()) for ex in seen}
    subjects = {_family(_question(ex)) for ex in seen}
    clash = [ex.where for ex in test if _family(_question(ex)) in subjects]
    assert not clash, clash
    # Any subject in another family, e.g. "goose" as a plural and as an animal sound, is also kept apart.
    assert not {_family(_question(ex))[1] for ex in test} & {s for _, s in subjects}
    if (
        name == "bold"
    ):  # an opposite pair in either order: "long" -> short in train, "short" -> ? in test
        pattern = re.compile(STAGES[name]["answer_regex"])
        words = lambda rows: {
            w.lower()
            for ex in rows
            if _family(_question(ex))[0] == "opposite"
            for w in (_family(_question(ex))[1], extract(pattern, ex.demonstration))
        }
        assert not words(test) & words(seen), words(test) & words(seen)


def _prompt_text(example) -> str:
    return " ".join(_question(example).lower().split())


def _lr_valid_clashes(rows, seen) -> list[str]:
    """Where (file:line) a row of `rows` repeats a prompt of `seen`, or asks about one of its subjects
    in any family ("goose" as a plural and as an animal sound counts)."""
    prompts = {_prompt_text(ex) for ex in seen}
    subjects = {_family(_question(ex))[1] for ex in seen}
    return [
        ex.where
        for ex in rows
        if _prompt_text(ex) in prompts or _family(_question(ex))[1] in subjects
    ]


def test_lr_valid_is_the_valid_split_and_32_more_demonstrations_apart_from_train_and_test():
    data = load_dataset(RETENTION / "data")
    rows = load_examples(LR_VALID)
    assert len(rows) == 40
    assert (
        LR_VALID.read_text().splitlines()[:8]
        == (RETENTION / "data" / "valid.jsonl").read_text().splitlines()
    )
    for ex in rows:
        spans = BOLD_SPAN.findall(ex.demonstration)
        assert (
            len(spans) == 1
            and ex.demonstration.count("**") == 2
            and spans[0].strip() == spans[0] != ""
        ), ex.where
    prompts = [_prompt_text(ex) for ex in rows]
    assert len(set(prompts)) == len(prompts), "a question is repeated"
    subjects = [_family(_question(ex))[1] for ex in rows]
    assert len(set(subjects)) == len(subjects), "a subject is repeated"
    held_out = data["train"] + data["test"]
    assert not _lr_valid_clashes(rows, held_out)
    # An opposite pair in either order, for the 32 added ("light" -> dark was in valid before test's heavy -> light).
    words = lambda exs: {
        w.lower()
        for ex in exs
        if _family(_question(ex))[0] == "opposite"
        for w in (_family(_question(ex))[1], extract(BOLD_SPAN, ex.demonstration))
    }
    assert not words(rows[8:]) & words(held_out + data["valid"]), words(rows[8:]) & words(
        held_out + data["valid"]
    )


def test_lr_valid_overlap_check_catches_a_train_question_and_a_test_subject(tmp_path):
    data = load_dataset(RETENTION / "data")
    extra = tmp_path / "extra.jsonl"
    extra.write_text(
        '{"prompt": "What color is snow?", "completion": "Snow is **white**."}\n'
        '{"prompt": "What is the capital of Zambia?", "completion": "The capital of Zambia is **Lusaka**."}\n'
        + (RETENTION / "data" / "train.jsonl").read_text().splitlines()[0]
        + "\n"
        '{"prompt": "What is the plural of \\"owl\\"?", "completion": "The plural of \\"owl\\" is **owls**."}\n'
    )
    assert _lr_valid_clashes(load_examples(extra), data["train"] + data["test"]) == [
        f"{extra}:3",
        f"{extra}:4",
    ]
