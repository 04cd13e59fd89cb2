"""The guards' math against the float64 twins (values and gradients), hand-computed cases, and
the early stop on the tiny model keeping the last good adapters."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.core import guards, losses, reference
from mlx_sdft.errors import TrainingError


def case(seed, B=3, T=7, V=11, Td=5):
    rng = np.random.default_rng(seed)
    f = lambda *s: (2 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    mask = (np.arange(T)[None] < np.array([T, 4, 6])[:, None]).astype(np.float32)
    demo_mask = (np.arange(Td)[None] < np.array([Td, 3, 2])[:, None]).astype(np.float32)
    return dict(
        student=f(B, T, V),
        teacher=f(B, T, V),
        base=f(B, T, V),
        mask=mask,
        truncated=[False, True, False],
        demo=f(B, Td, V),
        targets=rng.integers(0, V, (B, Td)),
        demo_mask=demo_mask,
    )


def mlx_objective(
    c, student, demo, *, truncated_mode, sft_weight, base_kl_weight, divergence="forward", skip=3
):
    """The objective as core/train.student_loss builds it, from the same functions."""
    mask = guards.keep_rows(mx.array(c["mask"]), c["truncated"], truncated_mode)
    sdft, _ = losses.sdft_loss(
        student, mx.array(c["teacher"]), mask, divergence=divergence, skip=skip, beta=0.5
    )
    sft = losses.sft_loss(demo, mx.array(c["targets"]), mx.array(c["demo_mask"]))[0]
    base_kl = guards.base_kl_loss(student, mx.array(c["base"]), mask)
    return guards.regularized_loss(
        sdft, sft=sft, base_kl=base_kl, sft_weight=sft_weight, base_kl_weight=base_kl_weight
    )


def reference_guards(c, *, truncated_mode, sft_weight, base_kl_weight):
    """The guards of case `c` for the numpy objective."""
    return reference.Guards(
        truncated_mode=truncated_mode,
        sft_weight=sft_weight,
        demo_logits=c["demo"],
        demo_targets=c["targets"],
        demo_mask=c["demo_mask"],
        base_kl_weight=base_kl_weight,
        base_logits=c["base"],
    )


@pytest.mark.parametrize("truncated_mode", ["keep", "mask"])
@pytest.mark.parametrize(
    "sft_weight, base_kl_weight", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.3), (1.0, 2.0)]
)
@pytest.mark.parametrize("divergence", ["forward", "reverse"])
def test_regularized_loss_matches_reference(truncated_mode, sft_weight, base_kl_weight, divergence):
    c = case(7)
    kw = dict(truncated_mode=truncated_mode, sft_weight=sft_weight, base_kl_weight=base_kl_weight)
    fn = lambda s, d: mlx_objective(c, s, d, divergence=divergence, **kw)  # noqa: E731
    value = fn(mx.array(c["student"]), mx.array(c["demo"]))
    g_student, g_demo = mx.grad(fn, argnums=(0, 1))(mx.array(c["student"]), mx.array(c["demo"]))
    args = (c["student"], c["teacher"], c["mask"], c["truncated"], reference_guards(c, **kw))
    ref = dict(divergence=divergence, skip=3, beta=0.5)
    want = reference.regularized_loss(*args, **ref)
    want_student, want_demo = reference.regularized_loss_grad(*args, **ref)
    np.testing.assert_allclose(value.item(), want, rtol=1e-5)
    np.testing.assert_allclose(np.array(g_student), want_student, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.array(g_demo), want_demo if want_demo is not None else 0.0, rtol=1e-4, atol=1e-7
    )


def test_reference_gradient_matches_finite_differences():
    c = case(3)
    c = {
        k: (v.astype(np.float64) if isinstance(v, np.ndarray) and v.dtype == np.float32 else v)
        for k, v in c.items()
    }
    extra = reference_guards(c, truncated_mode="mask", sft_weight=0.7, base_kl_weight=0.4)
    kw = dict(divergence="forward", skip=3, beta=0.5)
    g_student, _ = reference.regularized_loss_grad(
        c["student"], c["teacher"], c["mask"], c["truncated"], extra, **kw
    )
    eps = 1e-6
    for idx in [(0, 3, 2), (0, 6, 10), (2, 5, 0), (1, 0, 1)]:
        up, down = c["student"].copy(), c["student"].copy()
        up[idx] += eps
        down[idx] -= eps
        fd = (
            reference.regularized_loss(up, c["teacher"], c["mask"], c["truncated"], extra, **kw)
            - reference.regularized_loss(down, c["teacher"], c["mask"], c["truncated"], extra, **kw)
        ) / (2 * eps)
        assert g_student[idx] == pytest.approx(fd, abs=1e-7)
    assert not g_student[1].any()  # the truncated row is masked out: no gradient at all


def test_hand_computed_terms():
    # Two tokens, vocabulary 2: student uniform, base certain-ish; KL(base‖student) per token
    # = Σ q log(q/p) with q = softmax([log 3, 0]) = (3/4, 1/4), p = (1/2, 1/2).
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    student = mx.zeros((1, 2, 2))
    base = mx.array([[[np.log(3.0), 0.0]] * 2])
    assert guards.base_kl_loss(student, base, mx.ones((1, 2))).item() == pytest.approx(kl, rel=1e-6)
    # keep_rows: the truncated row of a two-row batch loses its tokens, the other keeps them.
    mask = guards.keep_rows(mx.ones((2, 3)), [True, False], "mask")
    assert mask.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert guards.keep_rows(mx.ones((2, 3)), [True, False], "keep").tolist() == [
        [1, 1, 1],
        [1, 1, 1],
    ]
    total = guards.regularized_loss(
        mx.array(1.0), sft=mx.array(2.0), base_kl=mx.array(4.0), sft_weight=0.5, base_kl_weight=0.25
    )
    assert total.item() == pytest.approx(1 + 1 + 1)
    assert guards.regularized_loss(mx.array(1.0)).item() == 1.0  # weights 0: pure SDFT


@pytest.mark.parametrize(
    "demo, multiple, cap, want",
    [
        (10, 2.0, 1024, 20),
        (10, 1.55, 1024, 16),
        (3, 2.0, 1024, 16),  # floor 16
        (100, 1.5, 1024, 150),
        (100, 1.5, 64, 64),
        (7, 3.0, 10, 10),  # the cap wins, even over the floor
        (11, 1.5, 1024, 17),  # ceil(16.5)
    ],
)
def test_demonstration_budget(demo, multiple, cap, want):
    assert guards.demonstration_budget(demo, multiple, cap) == want


def test_shared_prefix():
    demos = [
        [5, 6, 7, 1],
        [5, 6, 7, 2, 3],
        [5, 6, 8, 4],
        [9, 9],
        [5, 6, 7],
    ]  # [5,6,7] is not longer than 3
    assert guards.shared_prefix(demos, 3) == (pytest.approx(2 / 3), [5, 6, 7])
    assert guards.shared_prefix(demos, 2) == (1.0, [5, 6])  # [9, 9] is not longer than 2
    assert guards.shared_prefix(demos, 1) == (pytest.approx(4 / 5), [5])
    assert guards.shared_prefix(demos, 0) == (0.0, [])
    assert guards.skipped_prefix_warning(demos, 3, str).startswith(
        "67% of the demonstrations (2 of the 3 longer than 3 tokens) open with the same 3 tokens"
    )
    assert guards.skipped_prefix_warning([[1, 2, 3, 4], [2, 2, 3, 4], [3, 2, 3, 4]], 3, str) is None
    # a personal store: one long answer among short ones is not "100% of the demonstrations"
    assert guards.skipped_prefix_warning([[5, 6, 7, 8, 9], [1, 2], [3], [4, 4, 4]], 3, str) is None


def test_degenerate_watch():
    watch = guards.DegenerateWatch(0.3)
    assert watch.ok(0.1) and watch.start == 0.1
    assert watch.ok(0.4) and not watch.ok(0.41)
    assert watch.ok(0.0)


def test_early_stop_keeps_the_last_good_adapters(tiny_model, smoke_data, tmp_path, monkeypatch):
    """Degenerate rates 0, 0, 1 at the reports of steps 1, 2, 3: the run stops at step 3 and the
    folder holds step 2's adapters, optimizer and teacher, not step 3's."""
    from mlx_sdft.config import load_config
    from mlx_sdft.core import train as train_module
    from mlx_sdft.jobs.train import run_train

    rates = iter([0.0, 0.0, 1.0, 1.0])
    monkeypatch.setattr(
        train_module,
        "degeneration_sums",
        lambda completions, *a: {"degenerate": len(completions) * next(rates), "len_ratio": 1.0},
    )
    seen = {}
    real_snapshot = guards.snapshot

    def spy(step, model, *args):
        seen[step] = {k: np.array(v) for k, v in guards.trainable_leaves(model).items()}
        return real_snapshot(step, model, *args)

    monkeypatch.setattr(guards, "snapshot", spy)
    real_keep = guards.keep_last_good

    def spy_keep(good, model, *args, **kw):
        seen["at_stop"] = {k: np.array(v) for k, v in guards.trainable_leaves(model).items()}
        real_keep(good, model, *args, **kw)
        seen["after"] = {k: np.array(v) for k, v in guards.trainable_leaves(model).items()}

    monkeypatch.setattr(guards, "keep_last_good", spy_keep)
    out = tmp_path / "a"
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=4,
        iters=5,
        max_completion_length=8,
        learning_rate=1e-2,
        steps_per_report=1,
        steps_per_eval=100,
        save_every=1,
        max_degenerate_rise=0.5,
    )
    record = run_train(load_config(None, opts), quiet=True)
    assert record["type"] == "stop" and record["step"] == 3 and record["kept_step"] == 2
    assert set(seen) == {1, 2, "at_stop", "after"}
    kept = mx.load(str(out / "adapters.safetensors"))
    assert any(
        not np.array_equal(seen["at_stop"][k], seen[2][k]) for k in kept
    )  # step 3 had moved on
    for k, v in kept.items():
        np.testing.assert_array_equal(np.array(v), seen[2][k])  # the file holds step 2's adapters
        np.testing.assert_array_equal(seen["after"][k], seen[2][k])  # and so does the model
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "0000003_adapters.safetensors").exists()
    from mlx_sdft.formats.checkpoint import saved_step

    assert saved_step(out / "teacher_adapters.safetensors") == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {
        "type": "stop",
        "step": 3,
        "kept_step": 2,
        "degenerate": 1.0,
        "degenerate_start": 0.0,
    }


def _first_step(tiny_model, smoke_data, out, **kw):
    """One step from the paper's objective (PAPER_SDFT: no guard on), `kw` turning guards on."""
    from mlx_sdft.config import PAPER_SDFT, load_config
    from mlx_sdft.jobs.train import run_train

    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=4,
        iters=1,
        max_completion_length=12,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=100,
        **PAPER_SDFT,
    )
    return run_train(load_config(None, {**opts, **kw}), quiet=True)


def test_loss_terms_are_wired_into_training(tiny_model, smoke_data, tmp_path):
    """At step 1 every run samples the same completions from the same weights, so the terms add up.
    Fresh adapters are the base model: the base-KL term is 0. Started from trained adapters it is
    > 0. The SFT term is what --method sft computes on the same batch."""
    pure = _first_step(tiny_model, smoke_data, tmp_path / "pure")["loss"]
    assert _first_step(tiny_model, smoke_data, tmp_path / "base0", base_kl_weight=0.5)[
        "loss"
    ] == pytest.approx(pure, rel=1e-6)
    _first_step(tiny_model, smoke_data, tmp_path / "trained", iters=3, learning_rate=1e-2)
    start = dict(resume_adapter_file=str(tmp_path / "trained" / "adapters.safetensors"))
    moved = _first_step(tiny_model, smoke_data, tmp_path / "moved", **start)["loss"]
    assert (
        _first_step(tiny_model, smoke_data, tmp_path / "base1", base_kl_weight=0.5, **start)["loss"]
        > moved + 1e-4
    )
    sft = _first_step(tiny_model, smoke_data, tmp_path / "sft", method="sft")["loss"]
    with_sft = _first_step(tiny_model, smoke_data, tmp_path / "mix", sft_weight=0.25)["loss"]
    assert with_sft == pytest.approx(pure + 0.25 * sft, rel=1e-5)
    chunked = _first_step(
        tiny_model, smoke_data, tmp_path / "chunk", sft_weight=0.25, logits_chunk=5
    )["loss"]
    assert chunked == pytest.approx(with_sft, rel=1e-5)  # every objective carries the guards
    topk = _first_step(
        tiny_model, smoke_data, tmp_path / "topk", base_kl_weight=0.5, sft_weight=0.25, topk=5
    )
    assert np.isfinite(topk["loss"])


def test_completion_budget_and_truncated_mask(tiny_model, smoke_data, tmp_path):
    # The smoke demonstrations are 9-13 tokens: a budget of 1x leaves the floor, 16 tokens, of 64.
    record = _first_step(
        tiny_model, smoke_data, tmp_path / "b", completion_budget=1.0, max_completion_length=64
    )
    assert record["completion_len"] <= guards.BUDGET_FLOOR
    # Off (--completion-budget 0, PAPER_SDFT's): the tiny model never stops, so every completion is the cap.
    assert (
        _first_step(tiny_model, smoke_data, tmp_path / "off", max_completion_length=64)[
            "completion_len"
        ]
        == 64
    )
    # Every completion truncated and masked: nothing reaches the loss, so the run fails
    # after reporting its step, and saves no adapters.
    for name, extra in (("m", {}), ("mc", {"logits_chunk": 2})):
        with pytest.raises(TrainingError, match="had a token in the loss"):
            _first_step(
                tiny_model,
                smoke_data,
                tmp_path / name,
                truncated="mask",
                max_completion_length=4,
                **extra,
            )
        [masked] = [
            r
            for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"
        ]
        assert masked["truncated"] == 1.0 and masked["loss"] == 0.0 and masked["empty_batches"] == 1
        assert not (tmp_path / name / "adapters.safetensors").exists()
    # With --sft-weight the demonstrations still train when every completion is masked: not an
    # empty run, and its adapters are saved.
    both = _first_step(
        tiny_model,
        smoke_data,
        tmp_path / "ms",
        truncated="mask",
        max_completion_length=4,
        sft_weight=1.0,
    )
    assert both["truncated"] == 1.0 and both["loss"] > 0 and both["empty_batches"] == 0
    assert (tmp_path / "ms" / "adapters.safetensors").exists()
    logged = [
        json.loads(line)
        for line in (tmp_path / "ms" / "completions.jsonl").read_text().splitlines()
    ]
    assert logged and all(
        row["truncated"] and row["masked"] for row in logged
    )  # they trained on nothing
    kept = _first_step(tiny_model, smoke_data, tmp_path / "k", max_completion_length=4)
    assert kept["truncated"] == 1.0 and kept["loss"] > 0


def test_train_warns_when_the_skipped_prefix_is_shared(tiny_model, smoke_data, tmp_path):
    """Every smoke demonstration opens "The capital of …" / "The opposite of …": the paper's skip of 3
    hides it; the default (0) hides nothing, so nothing is said."""
    import io

    from rich.console import Console

    from mlx_sdft.config import load_config
    from mlx_sdft.jobs.train import run_train

    def output(**kw):
        buf = io.StringIO()
        opts = dict(
            model=str(tiny_model),
            data=str(smoke_data),
            adapter_path=str(tmp_path / "w"),
            iters=1,
            num_layers=-1,
            max_completion_length=4,
            steps_per_eval=100,
            dry_run=True,
        )
        run_train(load_config(None, {**opts, **kw}), console=Console(file=buf, width=400))
        return buf.getvalue()

    text = output(skip_first_tokens=3)  # a dry run: no weights load, the input is checked
    assert (
        "of the demonstrations (" in text
        and "open with the same 3 tokens" in text
        and "--skip-first-tokens 0 trains on it" in text
    )
    assert "open with the same" not in output()
    assert "open with the same" not in output(method="sft", skip_first_tokens=3)


def test_a_lesson_without_a_demonstration_is_left_alone_by_the_demonstration_guards(
    tiny_model, tmp_path
):
    """A feedback lesson (`learn`, `lessons --export`) has no demonstration: its demo_ids are an empty
    turn. The SFT term would teach that empty answer, a budget of M x its length would be the floor,
    and a truncation at --max-completion-length says nothing of its answer's length; the SFT term,
    the budget and the mask leave such a lesson alone, and act on the demonstrations beside it."""
    from mlx_sdft.config import load_config
    from mlx_sdft.core.data import load_examples
    from mlx_sdft.core.prompts import encode_examples
    from mlx_sdft.core.guards import completion_budget

    template = "{question}\nYour earlier answer: {answer}\nFeedback: {feedback}"
    lessons = [
        {
            "prompt": f"Name a colour number {i}.",
            "teacher_template": template,
            "context": {"answer": "Blue.", "feedback": "Answer with a longer sentence."},
        }
        for i in range(4)
    ]
    data = tmp_path / "lessons.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lessons))
    guarded = dict(
        completion_budget=2.0, sft_weight=0.5, truncated="mask", max_completion_length=24
    )
    with_sft = _first_step(tiny_model, data, tmp_path / "a", **guarded)
    without = _first_step(tiny_model, data, tmp_path / "b", **{**guarded, "sft_weight": 0.0})
    assert (
        with_sft["loss"] == pytest.approx(without["loss"], rel=1e-6) and with_sft["loss"] > 0
    )  # not masked
    assert (
        with_sft["completion_len"] == 24 and with_sft["truncated"] == 1.0
    )  # the cap, not the 16-token floor
    logged = [
        json.loads(line) for line in (tmp_path / "a" / "completions.jsonl").read_text().splitlines()
    ]
    assert logged and not any(row.get("masked") for row in logged)

    from mlx_lm import load

    _, tokenizer = load(str(tiny_model))
    demo = {
        "prompt": "What is the capital of France?",
        "completion": "The capital of France is Paris.",
    }
    data.write_text("".join(json.dumps(line) + "\n" for line in (demo, lessons[0])))
    cfg = load_config(None, dict(model=str(tiny_model), data=str(data), max_completion_length=64))
    shown, fed = encode_examples(
        tokenizer, load_examples(data), cfg.teacher_template, cfg.max_seq_length
    )
    assert (shown.demonstrated, fed.demonstrated) == (True, False)
    bounds = guards.Budget.of(cfg)
    assert (
        completion_budget(shown, bounds)
        == guards.demonstration_budget(len(shown.demo_ids), 2.0, 64)
        < 64
    )
    assert completion_budget(fed, bounds) == 64
