"""The gate's decisions from the measures of two versions: a new rule passes when its gap falls or
when what a user sees (compliance without the rule) moved to it; prior answers are compared over
the questions the rules themselves do not change."""

from contextlib import nullcontext
from types import SimpleNamespace

from mlx_sdft.jobs import gate
from mlx_sdft.measure import rules as measure_rules
from mlx_sdft.measure.version import MIN_LIFT

CFG = SimpleNamespace(
    gate_min_gain=0.0,
    gate_rule_tolerance=0.05,
    gate_questions=4,
    gate_question_tokens=8,
    gate_batch_size=4,
)
NEW, EARLIER = (
    {"id": 3, "kind": "rule", "state": "new"},
    {"id": 1, "kind": "rule", "state": "learned"},
)


def test_a_new_rule_passes_when_its_gap_falls():
    assert gate.rule_check(NEW, {"gap": 0.14}, {"gap": 0.10}, CFG)["passed"]
    assert not gate.rule_check(NEW, {"gap": 0.14}, {"gap": 0.14}, CFG)["passed"]


def test_a_new_rule_with_a_check_passes_when_answers_move_to_it_though_its_gap_rose():
    """As measured on Qwen2.5-Coder-0.5B with "Always answer in French.": the candidate answered in
    French 0.25 of held-out prompts without the rule (0.00 before) while the gap rose 0.142 -> 0.199."""
    moved = gate.rule_check(
        NEW, {"gap": 0.142, "compliance": 0.0}, {"gap": 0.199, "compliance": 0.25}, CFG
    )
    assert moved["passed"] and moved["change"] > 0
    barely = gate.rule_check(
        NEW, {"gap": 0.142, "compliance": 0.0}, {"gap": 0.199, "compliance": MIN_LIFT - 0.05}, CFG
    )
    assert not barely["passed"]
    assert not gate.rule_check(NEW, {"gap": 0.142}, {"gap": 0.199}, CFG)[
        "passed"
    ]  # no check: the gap decides


def test_an_earlier_rule_may_rise_by_the_tolerance_only():
    assert gate.rule_check(
        EARLIER, {"gap": 0.10, "compliance": 1.0}, {"gap": 0.15, "compliance": 1.0}, CFG
    )["passed"]
    assert not gate.rule_check(
        EARLIER, {"gap": 0.10, "compliance": 0.0}, {"gap": 0.16, "compliance": 1.0}, CFG
    )["passed"]  # a compliance lift is no excuse


def test_prior_answers_leave_out_the_questions_the_rules_change():
    current, candidate = [True, True, True, False], [False, True, False, False]
    whole = gate._prior_check(current, candidate, [], 0.05)
    assert (whole["current"], whole["candidate"], whole["questions"], whole["lost"]) == (
        0.75,
        0.25,
        4,
        [0, 2],
    )
    left = gate._prior_check(
        current, candidate, [0], 0.05
    )  # told the rules, the base model misses question 0
    assert (left["current"], left["candidate"], left["questions"], left["lost"]) == (
        2 / 3,
        1 / 3,
        3,
        [2],
    )
    assert left["changed_by_rules"] == [0]


def test_the_questions_the_rules_change_are_those_the_base_model_told_them_misses(monkeypatch):
    asked = []

    def prior_answers(
        model, tokenizer, questions, max_tokens, batch_size, advance=None, rules=None
    ):
        asked.append(rules)
        return {"accuracy": 0.5, "right": [True, False, True, False]}

    monkeypatch.setattr(measure_rules, "prior_answers", prior_answers)
    monkeypatch.setattr(gate, "using", lambda model, leaves: nullcontext())
    assert (
        gate._changed_by_rules(None, None, {}, None, CFG, print) == [] and asked == []
    )  # no rules: none asked
    assert gate._changed_by_rules(None, None, {}, "Always answer in French.", CFG, print) == [1, 3]
    assert asked == ["Always answer in French."]


def test_prior_answers_told_the_rules_have_them_in_the_system_message(monkeypatch):
    seen = []

    def greedy(model, tokenizer, prompts, *args, **kwargs):
        seen.extend(prompts)
        return measure_rules.Answers(
            ["sept"] * len(prompts), [[]] * len(prompts), [False] * len(prompts), []
        )

    monkeypatch.setattr(measure_rules, "greedy", greedy)
    tokenizer = SimpleNamespace(chat_template="{{ messages }}")
    questions = [{"prompt": "How many days are in a week?", "completion": "seven|7"}]
    out = measure_rules.prior_answers(
        None, tokenizer, questions, 8, 1, rules="Always answer in French."
    )
    assert out["right"] == [False]
    assert seen[0][0] == {"role": "system", "content": "Always answer in French."}
    assert seen[0][-1] == {"role": "user", "content": "How many days are in a week?"}


def test_prior_answers_pass_only_while_the_rules_leave_most_of_what_is_known_alone():
    """As measured on Qwen2.5-Coder-0.5B told "start with 'Answer:'" and "answer in French": of the
    24 prior questions the current version answered right, the base model told them missed 16; a
    candidate that kept the other 8 said, without the rules, "Leibniz developed the theory of
    relativity". Told French alone it missed 11 of 25: still counted."""
    current = [True] * 24 + [False] * 8
    few = gate._prior_check(current, current, list(range(8, 24)) + [24, 25], 0.05)
    assert few["known_changed"] == [16, 24] and few["candidate"] == few["current"]  # none lost
    assert few["too_few"] and not few["passed"]
    enough = gate._prior_check(current, current, list(range(13, 24)), 0.05)
    assert enough["known_changed"] == [11, 24] and not enough["too_few"] and enough["passed"]
    lost = gate._prior_check(current, [False] * 32, list(range(13, 24)), 0.05)
    assert not lost["too_few"] and not lost["passed"]
    unknown = gate._prior_check([False] * 4, [False] * 4, [0, 1, 2, 3], 0.05)
    assert not unknown["too_few"] and unknown["passed"]  # nothing known: nothing to forget
    line = (
        "gate 6 (prior answers): the rules change the answers to 16 of the 24 prior questions the "
        "current version answers right (the base model told them gets them wrong), too many to tell "
        "forgetting from what they ask"
    )
    assert "stay in serve's prompt" in gate.advice(line)
