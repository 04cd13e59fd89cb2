"""The measurement library (mlx_sdft/measure/) on the tiny model: each number against a direct
numpy float64 computation (core/reference.py's twins) or hand-built logits."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.core import reference
from mlx_sdft.core.data import Example
from mlx_sdft.core.prompts import encode_examples
from mlx_sdft.formats.models import load_tokenizer, open_model
from mlx_sdft.measure.perplexity import perplexity
from mlx_sdft.measure.retention import load_prompts, rate, retention_kl
from test_evaluate import _trained_adapters, _untrained_adapters

TEMPLATE = "{question}\nA good answer: {demonstration}\nNow answer it yourself."


def _logits(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    """Float64 logits [T, V] predicting each completion token after `prompt`, by one plain forward."""
    ids = prompt + completion
    return np.array(model(mx.array([ids]))[0], dtype=np.float64)[len(prompt) - 1 : len(ids) - 1]


def _pairs(tok, n: int = 3):
    examples = [
        Example(
            [{"role": "user", "content": f"What is {i} plus {i}?" + " Quickly." * i}],
            f"It is {2 * i}." + " Surely." * (n - i),
        )
        for i in range(n)
    ]  # lengths differ: padding
    return encode_examples(tok, examples, TEMPLATE, 2048)


def test_retention_kl_is_zero_untrained_and_positive_after_training(
    tiny_model, smoke_data, tmp_path
):
    tok = load_tokenizer(tiny_model)
    prompts = load_prompts(None, 6)
    assert len(load_prompts(None, 1000)) == 100  # the bundled general prompts
    model, base = open_model(
        tiny_model, adapters=_untrained_adapters(tiny_model, tmp_path / "zero")
    )
    assert retention_kl(model, tok, base, prompts, 8, 4) == pytest.approx(0.0, abs=1e-6)
    model, base = open_model(
        tiny_model, adapters=_trained_adapters(tiny_model, smoke_data, tmp_path / "trained")
    )
    assert retention_kl(model, tok, base, prompts, 8, 4) > 1e-3


def test_perplexity_matches_a_direct_computation(tiny, tiny_model):
    model, tok = tiny
    texts = ["The capital of Peru is Lima.", "The opposite of hot is cold."]
    ids = [tok.encode(t) for t in texts]
    nll, n = 0.0, 0
    for row in ids:
        logits = np.array(model(mx.array([row]))[0], dtype=np.float64)
        logprobs = logits - logits.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        nll -= logprobs[np.arange(len(row) - 1), row[1:]].sum()
        n += len(row) - 1
    assert perplexity(model, tok, texts, 2048, 2) == pytest.approx(np.exp(nll / n), rel=1e-4)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_demonstration_loglik_matches_numpy(tiny, role):
    """Per demonstration: the mean log-probability of its tokens after the role's prompt, batched
    with padding (batch 2 over 3 pairs of different lengths) as one plain forward per pair gives it."""
    from mlx_sdft.measure.teacher import demonstration_loglik

    model, tok = tiny
    pairs = _pairs(tok)
    got = demonstration_loglik(model, pairs, role, 2)
    for pair, value in zip(pairs, got, strict=True):
        prompt = pair.student_ids if role == "student" else pair.teacher_ids
        logprobs = reference.log_softmax(_logits(model, prompt, pair.demo_ids))
        want = logprobs[np.arange(len(pair.demo_ids)), pair.demo_ids].mean()
        assert value == pytest.approx(want, rel=1e-4)


def test_context_gain_averages_both_contexts(tiny):
    from mlx_sdft.measure.teacher import context_gain, demonstration_loglik

    model, tok = tiny
    pairs = _pairs(tok)
    student, teacher = (
        demonstration_loglik(model, pairs, role, 8) for role in ("student", "teacher")
    )
    gain = context_gain(model, pairs, 2)
    assert gain["examples"] == 3
    assert gain["student_loglik"] == pytest.approx(np.mean(student), rel=1e-5)
    assert gain["teacher_loglik"] == pytest.approx(np.mean(teacher), rel=1e-5)
    assert gain["improved_fraction"] == pytest.approx(
        np.mean([t > s for s, t in zip(student, teacher)])
    )


def test_teacher_agreement_on_hand_built_logits():
    from mlx_sdft.measure.teacher import teacher_agreement

    # Position 0: teacher argmax 1, sampled 1; position 1: teacher argmax 0, sampled 2; position 2 is padding.
    teacher = mx.array([[[0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    student = mx.zeros((1, 3, 3))
    mean_kl, differs = teacher_agreement(
        student, teacher, mx.array([[1, 2, 0]]), mx.array([[1.0, 1.0, 0.0]])
    )
    q = np.exp([5.0, 0, 0]) / np.exp([5.0, 0, 0]).sum()
    assert mean_kl == pytest.approx(
        float((q * np.log(q * 3)).sum()), rel=1e-5
    )  # KL(q‖uniform), both positions alike
    assert differs == 0.5


def test_feedback_fit_is_minus_the_teacher_student_kl_on_the_sample(tiny, monkeypatch):
    """−mean over the sample's tokens of KL(teacher‖student), each prompt's sample drawn with seed + i."""
    import mlx_sdft.measure.lessons as lessons

    model, tok = tiny
    pairs = _pairs(tok, 2)
    completions, seen = [[5, 17, 40, 2], [9, 9]], []

    def sample(model, prompts, budgets, stops, *, temperature, batch_size, seeds):
        assert temperature == 1.0 and budgets == [6] and batch_size == 1
        seen.extend(seeds)
        return SimpleNamespace(completions=[completions[len(seen) - 1]])

    monkeypatch.setattr(lessons, "sample", sample)
    got = lessons.feedback_fit(model, pairs, sorted(tok.eos_token_ids), 6, 1.0, seed=40)
    assert seen == [40, 41]
    for pair, completion, value in zip(pairs, completions, got, strict=True):
        teacher, student = (
            _logits(model, ids, completion) for ids in (pair.teacher_ids, pair.student_ids)
        )
        kl = reference.kl_of_logits(teacher, student)
        assert value == pytest.approx(-kl.mean(), rel=1e-4) and value < 0


def test_lesson_fit_routes_each_lesson_to_its_measure(tiny, tmp_path):
    """A lesson with a demonstration is fit by its log-likelihood after the bare prompt; one with
    feedback instead, by the feedback fit."""
    from mlx_sdft.config import FEEDBACK_TEMPLATE
    from mlx_sdft.measure.lessons import feedback_fit, lesson_fit
    from mlx_sdft.measure.teacher import demonstration_loglik
    from mlx_sdft.store.db import Store
    from mlx_sdft.store.lessons import to_example

    model, tok = tiny
    prompt = [{"role": "user", "content": "Name a fruit."}]
    with Store(tmp_path / "home") as store:
        ids = [
            store.add_lesson(kind="demonstration", prompt=prompt, text="A pear."),
            store.add_lesson(
                kind="feedback",
                prompt=prompt,
                answer="A car.",
                text="a fruit, please",
                teacher_template=FEEDBACK_TEMPLATE,
            ),
        ]
        rows = [store.lesson(i) for i in ids]
    cfg = SimpleNamespace(
        teacher_template=TEMPLATE, max_seq_length=2048, gate_batch_size=4, gate_max_tokens=5, seed=3
    )
    fits = lesson_fit(model, tok, rows, cfg)
    pairs = encode_examples(tok, [to_example(r) for r in rows], TEMPLATE, 2048)
    assert fits[ids[0]] == pytest.approx(
        demonstration_loglik(model, pairs[:1], "student", 4)[0], rel=1e-6
    )
    assert fits[ids[1]] == pytest.approx(
        feedback_fit(model, pairs[1:], sorted(tok.eos_token_ids), 5, 1.0, 3)[0], rel=1e-6
    )


def test_rate_is_the_share_of_flagged_answers():
    rows = [
        {"degenerate": True, "repetitive": False},
        {"degenerate": True, "repetitive": True},
        {"degenerate": False, "repetitive": False},
        {"degenerate": False, "repetitive": False},
    ]
    assert rate(rows) == 0.5 and rate(rows, "repetitive") == 0.25 and rate([]) == 0.0


def test_each_example_is_rendered_with_its_own_tools(tiny, monkeypatch):
    import mlx_sdft.measure.rules as answers  # where evaluation's greedy answers are rendered
    from mlx_sdft.core.metrics import exact
    from mlx_sdft.measure.task import evaluate_task

    model, tok = tiny
    seen, real = [], answers.render
    monkeypatch.setattr(
        answers, "render", lambda t, msgs, tools=None: seen.append(tools) or real(t, msgs)
    )
    examples = [
        Example(
            [{"role": "user", "content": "Hi?"}],
            "Hello.",
            tools=[{"name": f"tool{i}"}] if i else None,
        )
        for i in range(3)
    ]
    evaluate_task(model, tok, examples, exact, 2, batch_size=2)
    assert seen == [None, [{"name": "tool1"}], [{"name": "tool2"}]]


def test_a_long_measurement_says_its_progress_at_most_every_30_s_and_when_done(monkeypatch):
    from mlx_sdft.machine import report

    clock = iter([100.0, 110.0, 131.0, 140.0, 150.0])  # start, then one reading per call
    monkeypatch.setattr(report.time, "time", lambda: next(clock))
    lines = []
    advance = report.ProgressLines(lines.append, "gate, the candidate", 10)
    for n in (2, 4, 1, 3):
        advance(n)
    # 110: too soon; 131: 6 of 10 in 31 s, ~21 s left; 140: too soon again; 150: done, always said
    assert lines == [
        "gate, the candidate: 6/10 answers, 31 s, about 21 s left",
        "gate, the candidate: 10/10 answers, 50 s, about 0 s left",
    ]
