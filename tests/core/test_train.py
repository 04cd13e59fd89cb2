"""The training loop end to end on the tiny model: what changes, what is written, what loads."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sdft.config import PAPER_SDFT, load_config
from mlx_sdft.errors import InputError, TrainingError
from mlx_sdft.jobs.train import run_train
from mlx_sdft.core.train import TrainingArgs, batch_at, build_optimizer, total_steps

INPUTS = mx.array([[1, 300, 201, 293, 275, 289, 283, 276]])


def _cfg(tiny_model, smoke_data, out, **kw):
    opts = dict(
        model=str(tiny_model),
        data=str(smoke_data),
        adapter_path=str(out),
        num_layers=-1,
        batch_size=4,
        iters=3,
        max_completion_length=12,
        learning_rate=1e-3,
        steps_per_report=1,
        steps_per_eval=2,
        val_batches=1,
        save_every=2,
    )
    return load_config(None, {**opts, **kw})


def test_batch_stream_visits_every_example_once_per_epoch():
    stream = [i for c in range(0, 20, 4) for i in batch_at(c, 10, 4, seed=1)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # each epoch has its own order
    assert batch_at(8, 10, 4, seed=1) == stream[8:12]  # batches straddle epochs; a cursor is enough
    assert batch_at(0, 10, 4, seed=2) != batch_at(0, 10, 4, seed=1)


def test_total_steps(tiny_model, smoke_data, tmp_path):
    cfg = _cfg(
        tiny_model,
        smoke_data,
        tmp_path,
        iters=None,
        epochs=2,
        batch_size=4,
        grad_accumulation_steps=2,
    )
    assert total_steps(TrainingArgs.of(cfg), 16) == 4  # 2 epochs x 16 prompts / 8 prompts per step
    assert total_steps(TrainingArgs.of(_cfg(tiny_model, smoke_data, tmp_path, iters=7)), 16) == 7


def test_schedule_warms_up_then_decays_to_zero(tiny_model, smoke_data, tmp_path):
    opt = build_optimizer(
        TrainingArgs.of(
            _cfg(tiny_model, smoke_data, tmp_path, warmup_ratio=0.1, learning_rate=1e-3)
        ),
        100,
    )
    lrs = []
    for _ in range(100):
        opt.update({}, {})  # no parameters: only advances the schedule
        lrs.append(opt.learning_rate.item())
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(
        a >= b for a, b in zip(lrs[10:], lrs[11:])
    )
    assert lrs[-1] < 1e-5


def test_training_changes_only_the_adapters_and_writes_the_layout(
    tiny, tiny_model, smoke_data, tmp_path
):
    out = tmp_path / "adapters"
    record = run_train(_cfg(tiny_model, smoke_data, out), quiet=True)
    assert record["step"] == 3 and np.isfinite(record["loss"]) and record["loss"] > 0

    names = {p.name for p in out.iterdir()}
    assert names == {
        "adapter_config.json",
        "adapters.safetensors",
        "0000002_adapters.safetensors",
        "teacher_adapters.safetensors",
        "optimizer_state.safetensors",
        "trainer_state.json",
        "metrics.jsonl",
        "completions.jsonl",
        "train.lock",
    }
    assert (out / "train.lock").read_text() == ""  # released at the end
    student = mx.load(str(out / "adapters.safetensors"))
    teacher = mx.load(str(out / "teacher_adapters.safetensors"))
    assert student and all(k.rsplit(".", 1)[-1] in {"lora_a", "lora_b"} for k in student)
    assert teacher.keys() == student.keys()
    assert any(np.abs(np.array(v)).max() > 0 for k, v in student.items() if k.endswith("lora_b"))

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["cursor"] == 12
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["teacher"] == "ema" and config["sdft"]["step"] == 3 and config["num_layers"] == -1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in (
        "loss",
        "learning_rate",
        "sample_s",
        "teacher_s",
        "student_s",
        "sampled_tps",
        "trained_tps",
        "completion_len",
        "truncated",
        "degenerate",
        "len_ratio",
        "peak_memory_gb",
    ):
        assert key in train[0]
    assert 0 <= train[0]["degenerate"] <= 1 and train[0]["degenerate"] >= train[0]["truncated"]
    assert train[0]["len_ratio"] > 0
    assert [r["step"] for r in records if r["type"] == "eval"] == [2, 3]

    # mlx-lm loads the folder unchanged, and the adapted model differs from the base.
    from mlx_lm import load

    adapted, _ = load(str(tiny_model), adapter_path=str(out))
    base, _ = tiny
    assert not np.allclose(np.array(adapted(INPUTS)), np.array(base(INPUTS)), atol=1e-5)
    frozen = {k: v for k, v in tree_flatten(adapted.parameters()) if "lora" not in k}
    for k, v in tree_flatten(base.parameters()):
        key = k.replace(".weight", ".linear.weight") if k not in frozen else k
        np.testing.assert_array_equal(np.array(frozen[key]), np.array(v))


def test_same_seed_same_adapters(tiny_model, smoke_data, tmp_path):
    a = run_train(_cfg(tiny_model, smoke_data, tmp_path / "a", iters=2, seed=5), quiet=True)
    b = run_train(_cfg(tiny_model, smoke_data, tmp_path / "b", iters=2, seed=5), quiet=True)
    assert a["loss"] == b["loss"]
    wa, wb = (
        mx.load(str(tmp_path / "a/adapters.safetensors")),
        mx.load(str(tmp_path / "b/adapters.safetensors")),
    )
    for k in wa:
        np.testing.assert_array_equal(np.array(wa[k]), np.array(wb[k]))


@pytest.mark.parametrize("teacher,divergence", [("base", "reverse"), ("live", "jsd")])
def test_other_teachers_and_divergences_train(
    tiny_model, smoke_data, tmp_path, teacher, divergence
):
    out = tmp_path / "o"
    record = run_train(
        _cfg(
            tiny_model,
            smoke_data,
            out,
            iters=2,
            teacher=teacher,
            divergence=divergence,
            grad_accumulation_steps=2,
            num_generations=2,
            batch_size=2,
        ),
        quiet=True,
    )
    assert np.isfinite(record["loss"])
    assert (out / "teacher_adapters.safetensors").exists() == (teacher != "live")


def test_sft_method_trains_the_same_adapters(tiny_model, smoke_data, tmp_path):
    out = tmp_path / "sft"
    record = run_train(_cfg(tiny_model, smoke_data, out, method="sft"), quiet=True)
    assert record["loss"] > 0 and record["sample_s"] == 0.0
    assert "degenerate" not in record  # nothing is sampled
    assert not (out / "teacher_adapters.safetensors").exists()
    from mlx_lm import load

    load(str(tiny_model), adapter_path=str(out))  # same mlx-lm format


def test_sft_loss_is_cross_entropy_on_the_demonstration(tiny, tiny_model, smoke_data, tmp_path):
    from mlx_sdft.core.data import load_examples
    from mlx_sdft.core.prompts import encode_examples
    from mlx_sdft.core.objective import ObjectiveArgs, supervised_loss

    model, tok = tiny
    cfg = _cfg(tiny_model, smoke_data, tmp_path)
    [pair] = encode_examples(
        tok, load_examples(smoke_data / "valid.jsonl")[:1], cfg.teacher_template, 2048
    )
    assert tok.decode(pair.demo_ids) == "The capital of Portugal is Lisbon.<|im_end|>"
    loss, ntoks = supervised_loss(model, [pair], ObjectiveArgs.of(cfg))
    logits = np.array(model(mx.array([pair.student_ids + pair.demo_ids]))[0], dtype=np.float64)
    P = len(pair.student_ids)
    rows = logits[P - 1 : P - 1 + len(pair.demo_ids)]
    logprobs = rows - rows.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    want = -np.mean(logprobs[np.arange(len(pair.demo_ids)), pair.demo_ids])
    assert ntoks.item() == len(pair.demo_ids) and loss.item() == pytest.approx(want, rel=1e-5)


def test_topk_teacher_support_trains(tiny_model, smoke_data, tmp_path):
    record = run_train(_cfg(tiny_model, smoke_data, tmp_path / "k", iters=2, topk=8), quiet=True)
    assert np.isfinite(record["loss"]) and record["loss"] > 0


def assert_same_updates(out_a, out_b):
    """Two runs that should differ only by float32 rounding (other summation orders, another BLAS).
    With SGD an update is lr x gradient, so rounding stays rounding: measured ~5e-7 of the update
    size (lora_b starts at 0, so its values are the update). Adam would magnify it on near-zero
    gradients (g / sqrt(v) is +-1 at any scale), which is why these runs use SGD."""
    wa, wb = (
        mx.load(str(out_a / "adapters.safetensors")),
        mx.load(str(out_b / "adapters.safetensors")),
    )
    update = max(np.abs(np.array(wa[k])).max() for k in wa if "lora_b" in k)
    assert update > 0  # the adapters did train
    assert max(np.abs(np.array(wa[k]) - np.array(wb[k])).max() for k in wa) <= 2e-5 * update


@pytest.mark.parametrize("topk", [None, 8])
def test_logits_chunk_trains_the_same_adapters(tiny_model, smoke_data, tmp_path, topk):
    """Chunked scoring is the same loss: same samples, same updates, up to float32 rounding."""
    sgd = dict(iters=2, topk=topk, optimizer="sgd", learning_rate=0.1)
    whole = run_train(_cfg(tiny_model, smoke_data, tmp_path / "w", **sgd), quiet=True)
    chunked = run_train(
        _cfg(tiny_model, smoke_data, tmp_path / "c", logits_chunk=5, **sgd), quiet=True
    )
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert_same_updates(tmp_path / "w", tmp_path / "c")


def test_grad_checkpoint_is_exact_and_only_wraps_the_student_pass(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    from mlx_lm.models.llama import TransformerBlock

    from mlx_sdft.core import train

    plain = TransformerBlock.__call__
    seen = []
    real_sample = train.sample

    def watching_sample(*args, **kwargs):  # sampling must run the plain blocks
        seen.append(TransformerBlock.__call__ is plain)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train, "sample", watching_sample)
    sgd = dict(iters=2, optimizer="sgd", learning_rate=0.1)
    base = run_train(_cfg(tiny_model, smoke_data, tmp_path / "p", **sgd), quiet=True)
    ckpt = run_train(
        _cfg(tiny_model, smoke_data, tmp_path / "c", grad_checkpoint=True, **sgd), quiet=True
    )
    assert seen and all(seen) and TransformerBlock.__call__ is plain  # restored after each pass
    assert ckpt["loss"] == pytest.approx(base["loss"], rel=1e-5)
    assert_same_updates(tmp_path / "p", tmp_path / "c")


def test_context_that_leaves_no_loss_token_is_rejected_before_loading(
    tiny, tiny_model, smoke_data, tmp_path
):
    from mlx_sdft.core.data import load_dataset
    from mlx_sdft.core.prompts import encode_examples

    _, tok = tiny
    splits = load_dataset(smoke_data)
    cfg = _cfg(tiny_model, smoke_data, tmp_path / "a")
    longest = max(
        len(p.teacher_ids)
        for p in encode_examples(tok, splits["train"] + splits["valid"], cfg.teacher_template, 2048)
    )
    cfg = _cfg(
        tiny_model, smoke_data, tmp_path / "a", max_seq_length=longest + 3, skip_first_tokens=3
    )
    with pytest.raises(
        InputError, match=rf"jsonl:\d+: --max-seq-length {longest + 3} leaves 3 completion tokens"
    ):
        run_train(cfg, quiet=True)
    assert not (tmp_path / "a").exists()


# The paper's objective as flags: 3 tokens skipped, and no guard (no SFT term) to train on anything else.
PAPER_FLAGS = [
    "--skip-first-tokens",
    "3",
    "--completion-budget",
    "0",
    "--truncated",
    "keep",
    "--sft-weight",
    "0",
]


def test_a_run_in_which_nothing_reaches_the_loss_fails_and_saves_nothing(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    """Completions that stop within --skip-first-tokens (a model that ends its turn at once)."""
    _stopping_at_once(monkeypatch)
    from typer.testing import CliRunner

    from mlx_sdft.cli import app

    out = tmp_path / "a"
    with pytest.raises(
        TrainingError, match="no micro-batch of the 3 steps had a token in the loss"
    ):
        run_train(
            _cfg(
                tiny_model, smoke_data, out, save_every=100, grad_accumulation_steps=2, **PAPER_SDFT
            ),
            quiet=True,
        )
    assert not (out / "adapters.safetensors").exists()
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(tiny_model),
            "--data",
            str(smoke_data),
            "--iters",
            "1",
            "--num-layers",
            "-1",
            "--adapter-path",
            str(tmp_path / "cli"),
            "--max-completion-length",
            "6",
            *PAPER_FLAGS,
        ],
    )
    assert result.exit_code == 1 and "had a token in the loss" in result.stderr
    assert (
        "Adapters saved" not in result.output
        and not (tmp_path / "cli" / "adapters.safetensors").exists()
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["empty_batches"] for r in records if r["type"] == "train"] == [2, 2, 2]


def test_a_completion_budget_within_the_skipped_prefix_is_rejected_before_loading(
    tiny_model, smoke_data, tmp_path
):
    """--completion-budget gives every example at least its floor (16 tokens): with
    --skip-first-tokens at or above it no completion token would reach the loss."""
    from mlx_sdft.core import guards

    cfg = _cfg(
        tiny_model,
        smoke_data,
        tmp_path / "a",
        completion_budget=0.01,
        max_completion_length=64,
        skip_first_tokens=guards.BUDGET_FLOOR,
    )
    with pytest.raises(
        InputError,
        match=rf"train.jsonl:1: --completion-budget 0.01 allows it {guards.BUDGET_FLOOR} "
        rf"completion tokens, all within --skip-first-tokens {guards.BUDGET_FLOOR}",
    ):
        run_train(cfg, quiet=True)
    assert not (tmp_path / "a").exists()
    run_train(
        _cfg(
            tiny_model,
            smoke_data,
            tmp_path / "b",
            completion_budget=0.01,
            max_completion_length=64,
            skip_first_tokens=guards.BUDGET_FLOOR - 1,
            dry_run=True,
        ),
        quiet=True,
    )  # one token left: allowed


def _stopping_at_once(monkeypatch):
    from mlx_sdft.core import train

    real = train.sample

    def sample(*args, **kwargs):
        rollout = real(*args, **kwargs)
        rollout.completions = [c[:2] for c in rollout.completions]
        return rollout

    monkeypatch.setattr(train, "sample", sample)


def test_nothing_is_saved_before_a_token_reached_the_loss(
    tiny_model, smoke_data, tmp_path, monkeypatch
):
    """A run whose every step is empty saves no checkpoint on the way either (--save-every 1):
    its adapters would be the untrained start under a message saying nothing was saved. A Ctrl-C
    before any token reached the loss says that nothing was saved, and no --resume hint."""
    import mlx_sdft.jobs.train as launch
    from mlx_sdft.errors import Interrupted
    from test_resume import StopAt, _Ctx

    _stopping_at_once(monkeypatch)
    out = tmp_path / "a"
    with pytest.raises(
        TrainingError, match="no micro-batch of the 3 steps had a token in the loss"
    ):
        run_train(_cfg(tiny_model, smoke_data, out, save_every=1, **PAPER_SDFT), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "completions.jsonl",
        "metrics.jsonl",
        "train.lock",
    ]  # no weights

    monkeypatch.setattr(launch, "StopFlag", lambda reporter: _Ctx(StopAt(2)))
    with pytest.raises(
        Interrupted,
        match="interrupted after step 2, before any token reached the loss: nothing saved",
    ):
        run_train(
            _cfg(tiny_model, smoke_data, tmp_path / "b", save_every=1, **PAPER_SDFT), quiet=True
        )
    assert not any(p.name.endswith(".safetensors") for p in (tmp_path / "b").iterdir())


def test_empty_micro_batches_are_counted(tiny_model, smoke_data, tmp_path, monkeypatch):
    from mlx_sdft.core import train

    real, calls = train.sample, []

    def every_other_stops_at_once(*args, **kwargs):
        rollout = real(*args, **kwargs)
        calls.append(1)
        if len(calls) % 2:
            rollout.completions = [c[:2] for c in rollout.completions]
        return rollout

    monkeypatch.setattr(train, "sample", every_other_stops_at_once)
    out = tmp_path / "a"
    run_train(
        _cfg(
            tiny_model,
            smoke_data,
            out,
            iters=2,
            steps_per_eval=100,
            grad_accumulation_steps=2,
            **PAPER_SDFT,
        ),
        quiet=True,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["empty_batches"] for r in records if r["type"] == "train"] == [1, 1]


def _ragged(tmp_path):
    """Four demonstrations of 3 to about 90 tokens: any two hold another number of tokens than the
    other two, so micro-batches of two are ragged whichever way the epoch is shuffled."""
    answers = [
        "Lima.",
        "The capital of Peru is Lima.",
        "Lima is the capital of Peru, and the largest city of the country, on the Pacific coast of South America.",
        "Peru's capital is Lima. " * 12,
    ]
    data = tmp_path / "ragged"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "What is the capital of Peru?"},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
            + "\n"
            for a in answers
        )
    )
    return data


@pytest.mark.parametrize(
    "options",
    [{}, {"truncated": "keep", "base_kl_weight": 0.1}, {"method": "sft"}],
    ids=["defaults", "every-term", "sft"],
)
def test_gradient_accumulation_is_one_bigger_batch_for_every_objective(
    tiny_model, tmp_path, options
):
    """One step of 4 prompts and one of 2 x --grad-accumulation-steps 2 on the same prompts and samples
    give the same update and loss, the token-mean SFT term (--sft-weight, on by default; --method sft)
    included: each micro-batch's terms weigh by their share of the step's tokens (or sequences).
    Measured on these ragged demonstrations when each micro-batch's SFT mean counted alike: cosine
    0.963 between the two updates (0.973 with every term on), max difference 31% of the update;
    now 1 - 3e-14, 3e-7."""
    data = _ragged(tmp_path)
    sgd = dict(
        iters=1,
        optimizer="sgd",
        learning_rate=0.1,
        grad_clip=0,
        warmup_ratio=0.0,
        max_completion_length=32,
        steps_per_eval=100,
        **options,
    )
    one = run_train(_cfg(tiny_model, data, tmp_path / "one", batch_size=4, **sgd), quiet=True)
    two = run_train(
        _cfg(tiny_model, data, tmp_path / "two", batch_size=2, grad_accumulation_steps=2, **sgd),
        quiet=True,
    )
    for key in ("loss", "sdft_loss", "sft_loss", "base_kl"):
        assert (key in two) == (key in one), key  # a term is reported by both runs or by neither
        if key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (
                key
            )  # base_kl starts at ~0
    assert_same_updates(tmp_path / "one", tmp_path / "two")


def test_teacher_reference_and_validation_score_without_dropout(
    tiny, tiny_model, smoke_data, tmp_path, monkeypatch
):
    """With LoRA dropout, the teacher, the base model (--base-kl-weight) and validation score in eval
    mode: the same inputs twice give the same numbers (they differed by up to ~1 in a logit), while
    the student's training pass still draws its dropout."""
    from functools import partial

    from mlx.utils import tree_map

    from mlx_sdft.core import guards, train
    from mlx_sdft.core.data import load_dataset
    from mlx_sdft.core.objective import Objective, sdft_objective
    from mlx_sdft.core.prompts import encode_examples
    from mlx_sdft.core.teacher import init_teacher
    from mlx_sdft.formats.models import Adapters, open_model
    from mlx_sdft.core.train import PhaseTimer

    _, tok = tiny
    cfg = _cfg(
        tiny_model,
        smoke_data,
        tmp_path,
        batch_size=2,
        lora_parameters={"dropout": 0.5},
        base_kl_weight=0.1,
        truncated="keep",
    )
    mx.random.seed(0)
    model, base = open_model(
        tiny_model, adapters=Adapters(cfg.fine_tune_type, cfg.num_layers, cfg.lora_parameters)
    )
    # lora_b starts at 0, where dropout on the adapters' input changes nothing: move every leaf.
    model.update(
        tree_map(lambda v: v + 0.05 * mx.random.normal(v.shape), model.trainable_parameters())
    )
    teacher = init_teacher("ema", model, base)
    splits = load_dataset(smoke_data)
    pairs, valid = (
        encode_examples(tok, splits[s][:2], cfg.teacher_template, cfg.max_seq_length)
        for s in ("train", "valid")
    )

    seen = {"teacher": [], "base": []}
    args = train.TrainingArgs.of(cfg)
    objective, real_base = sdft_objective(args.objective), guards.base_logits

    def teacher_scores(*args):
        scores = objective.teacher_scores(*args)
        seen["teacher"].append(np.array(scores.astype(mx.float32)))
        return scores

    def base_logits(*args):
        logits = real_base(*args)
        seen["base"].append(np.array(logits.astype(mx.float32)))
        return logits

    monkeypatch.setattr(guards, "base_logits", base_logits)
    step = partial(
        train.sdft_step,
        args=args,
        stop_ids=sorted(tok.eos_token_ids),
        base=base,
        objective=Objective(teacher_scores, objective.student_loss),
    )
    model.train()
    losses = [
        step(model, teacher, pairs, [0, 1], grad=True, timer=PhaseTimer())[0].item()
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*seen["teacher"])
    np.testing.assert_array_equal(*seen["base"])
    assert losses[0] != losses[1]  # the student's pass: dropout on
    assert model.training  # each scoring pass gives the mode back
    vals = [train.validation_loss(model, teacher, valid, args, step) for _ in range(2)]
    assert vals[0] == vals[1] and model.training
