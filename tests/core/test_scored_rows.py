"""Completions without a loss token are scored by no pass (objective.scored_rows): the teacher, the
base model and the student's divergence pass run over the others alone, and the loss, its parts,
its token count and its gradient equal those of the full pass over every row (what the code did
before), for every objective; the --log-completions rows' losses come from the same passes and equal
each completion's loss on its own."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_sdft.config import Config
from mlx_sdft.core import guards, prefix, train
from mlx_sdft.core.objective import Objective, scored_rows, sdft_objective
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.rollout import Rollout
from mlx_sdft.core.teacher import trainable_leaves, using
from mlx_sdft.formats.models import Adapters, open_model

# Two lessons with a demonstration and a feedback lesson (no demonstration), two completions each.
PAIRS = [
    PromptPair([1, 5, 9, 13, 2, 7], [1, 5, 9, 13, 2, 7, 30, 31, 32, 7], [50, 51, 52, 2], "t:1"),
    PromptPair([300], [300, 201, 40, 41, 7], [60, 61, 62, 63, 64, 65, 2], "t:2"),
    PromptPair([4, 8, 15, 16, 23, 42, 99, 101, 7], [4, 8, 7], [2], "t:3", demonstrated=False),
]
G = 2


COMPLETIONS = [[11, 12, 2], [40, 41, 42, 43, 44], [8, 9, 10, 11, 12, 13, 14, 2], [20], [30, 31], []]
# "mixed": row 1 is masked (truncated, demonstrated), row 3 is all within --skip-first-tokens 1, row 5
# is empty; row 4 is truncated but a feedback lesson's, which the mask leaves in (guards.maskable).
# "all-masked": every completion of the demonstrated lessons truncated, the feedback lesson's empty.
SCENARIOS = {
    "mixed": (COMPLETIONS, [False, True, False, False, True, False]),
    "all-masked": (COMPLETIONS[:4] + [[], []], [True, True, True, True, False, False]),
}
OBJECTIVES = {
    "full": {},
    "full-skip": {"skip_first_tokens": 1},
    "jsd": {"divergence": "jsd", "skip_first_tokens": 1},
    "topk": {"topk": 8},
    "chunk": {"logits_chunk": 2},
    "topk-chunk": {"topk": 8, "logits_chunk": 3, "skip_first_tokens": 1},
    "base-kl": {"base_kl_weight": 0.3, "skip_first_tokens": 1},
    "topk-base-kl": {"topk": 8, "base_kl_weight": 0.3, "divergence": "reverse"},
}


@pytest.fixture(scope="module")
def lora(tiny_model):
    """The tiny model with non-zero LoRA adapters on every block, teacher leaves of their own, and the
    base leaves (adapters off) for --base-kl-weight."""
    mx.random.seed(5)
    model, base = open_model(tiny_model, adapters=Adapters("lora", -1, Config().lora_parameters))
    noise = lambda leaves, s: {k: v + s * mx.random.normal(v.shape) for k, v in leaves.items()}  # noqa: E731
    model.load_weights(list(noise(trainable_leaves(model), 0.05).items()), strict=False)
    model.train()
    return model, noise(trainable_leaves(model), 0.05), base


def _batch(scenario):
    completions, truncated = SCENARIOS[scenario]
    pairs = [p for p in PAIRS for _ in range(G)]
    return pairs, completions, guards.maskable(truncated, [p.demonstrated for p in pairs])


def _args(**options) -> train.TrainingArgs:
    """What the loop reads of train's options with these changed."""
    return train.TrainingArgs.of(Config(model="x", data="-", **options))


def _score(model, teacher, base, args, pairs, completions, truncated, rows):
    """The teacher's and the base model's scores of `rows` (None: every row, the guard without rows),
    then the student loss's value, ntoks, parts, own losses and gradient, as sdft_step runs them."""
    objective = sdft_objective(args)
    index = range(len(pairs)) if rows is None else rows
    scored = [pairs[i] for i in index], [completions[i] for i in index]
    with using(model, teacher):
        scores = objective.teacher_scores(model, *scored) if index else None
    base_logits = (
        guards.base_logits(model, base, *scored) if args.base_kl_weight and index else None
    )
    guard = guards.Guard(truncated, base_logits, rows)
    (loss, ntoks, parts, own), grads = nn.value_and_grad(model, objective.student_loss)(
        model, pairs, completions, scores, guard
    )
    mx.eval(loss, ntoks, parts, own, grads)
    return loss, ntoks, parts, own, grads


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.linalg.norm(a - b) <= rel * max(np.linalg.norm(b), 1e-12), (a, b)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("sft_weight", [0.5, 0.0])
@pytest.mark.parametrize("case", OBJECTIVES)
def test_the_rows_that_train_alone_give_the_full_pass(lora, case, sft_weight, scenario):
    model, teacher, base = lora
    args = _args(num_generations=G, sft_weight=sft_weight, **OBJECTIVES[case]).objective
    pairs, completions, truncated = _batch(scenario)
    rows = scored_rows(completions, truncated, args)
    if scenario == "all-masked":
        assert rows == []
    else:  # the masked row 1 and the empty row 5 left out; row 3 (one token) only where it has a loss token
        assert rows == (
            [0, 2, 3, 4] if args.base_kl_weight or not args.skip_first_tokens else [0, 2, 4]
        )
    dropped = _score(model, teacher, base, args, pairs, completions, truncated, rows)
    full = _score(model, teacher, base, args, pairs, completions, truncated, None)
    _close(dropped[0], full[0])
    assert dropped[1].item() == full[1].item()
    assert (
        dropped[2].keys()
        == full[2].keys()
        == {
            "sdft_loss",
            *(["sft_loss"] if sft_weight else []),
            *(["base_kl"] if args.base_kl_weight else []),
        }
    )
    for k in full[2]:
        _close(dropped[2][k], full[2][k])
    if scenario == "all-masked":
        assert dropped[2]["sdft_loss"].item() == 0.0 and dropped[1].item() == (
            full[1].item() if sft_weight else 0
        )
    trained = False
    for (k, a), (_, b) in zip(tree_flatten(dropped[4]), tree_flatten(full[4])):
        _close(a, b)
        trained |= bool(np.abs(np.array(a)).max() > 0)
    # A step with nothing at all trains nothing, as before; the SFT term alone still trains.
    assert trained == (scenario == "mixed" or sft_weight > 0)


def test_which_rows_are_scored():
    args = lambda **kw: _args(**kw).objective  # noqa: E731
    completions, truncated = (
        [[1, 2, 3], [1, 2], [1], [], [1, 2, 3]],
        [False, True, False, False, True],
    )
    assert scored_rows(completions, truncated, args(truncated="mask")) == [0, 2]
    assert scored_rows(completions, truncated, args(truncated="keep")) == [0, 1, 2, 4]
    assert scored_rows(completions, truncated, args(truncated="mask", skip_first_tokens=1)) == [0]
    # The base-KL term counts every completion token, the skipped ones too.
    assert scored_rows(completions, truncated, args(skip_first_tokens=1, base_kl_weight=0.1)) == [
        0,
        2,
    ]
    # Logged rows are scored for their own loss where they have a token of it, masked or not.
    assert scored_rows(completions, truncated, args(truncated="mask"), log=4) == [0, 1, 2]
    assert scored_rows(
        completions, truncated, args(truncated="mask", skip_first_tokens=1), log=4
    ) == [0, 1]


def _fixed_rollout(monkeypatch, completions, truncated):
    monkeypatch.setattr(train, "sample", lambda *args, **kwargs: Rollout(completions, truncated, 0))


def _counting(monkeypatch, objective):
    """An objective whose teacher counts the rows it scores, and the rows of every group of every
    prefix.grouped call (the teacher's, the student's, the base model's)."""
    seen = {"teacher": [], "grouped": []}
    grouped = prefix.grouped

    def counted_grouped(model, groups, *args, **kwargs):
        seen["grouped"].append([len(g[0]) for g in groups])
        return grouped(model, groups, *args, **kwargs)

    def teacher_scores(model, pairs, completions):
        seen["teacher"].append(len(pairs))
        return objective.teacher_scores(model, pairs, completions)

    monkeypatch.setattr(prefix, "grouped", counted_grouped)
    return Objective(teacher_scores, objective.student_loss), seen


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_the_teacher_and_the_base_model_score_fewer_rows(lora, monkeypatch, scenario):
    model, teacher, base = lora
    args = _args(num_generations=G, skip_first_tokens=1, base_kl_weight=0.3)
    _, completions, _ = _batch(scenario)
    _fixed_rollout(monkeypatch, completions, SCENARIOS[scenario][1])
    objective, seen = _counting(monkeypatch, sdft_objective(args.objective))
    loss, ntoks, _, stats = train.sdft_step(
        model,
        teacher,
        PAIRS,
        [0, 1, 2],
        grad=True,
        timer=train.PhaseTimer(),
        args=args,
        stop_ids=[2],
        objective=objective,
        base=base,
    )
    if (
        scenario == "mixed"
    ):  # rows 0, 2, 3, 4 of 6: the teacher's, the student's (and its 2 demonstrations), the base's
        assert seen == {"teacher": [4], "grouped": [[4], [4], [4, 2]]}
    else:  # no teacher or base pass at all; the student's pass holds the demonstrations alone
        assert seen == {"teacher": [], "grouped": [[0, 2]]}
        assert stats["parts"]["sdft_loss"].item() == stats["parts"]["base_kl"].item() == 0.0
        assert ntoks.item() == sum(len(p.demo_ids) for p in PAIRS if p.demonstrated)
    assert np.isfinite(loss.item()) and stats["truncated"] == sum(SCENARIOS[scenario][1])


def test_a_step_with_nothing_to_score_and_no_sft_term_trains_nothing(lora, monkeypatch):
    model, teacher, base = lora
    args = _args(num_generations=G, sft_weight=0.0)
    _fixed_rollout(monkeypatch, *SCENARIOS["all-masked"])
    objective, seen = _counting(monkeypatch, sdft_objective(args.objective))
    loss, ntoks, grads, stats = train.sdft_step(
        model,
        teacher,
        PAIRS,
        [0, 1, 2],
        grad=True,
        timer=train.PhaseTimer(),
        args=args,
        stop_ids=[2],
        objective=objective,
        base=base,
    )
    assert seen == {
        "teacher": [],
        "grouped": [[0, 0]],
    }  # the student's call has no row: no pass at all
    assert loss.item() == 0.0 and ntoks.item() == 0 and stats["parts"]["sdft_loss"].item() == 0.0
    assert tree_flatten(grads) and all(not np.array(g).any() for _, g in tree_flatten(grads))
    assert {k for k, _ in tree_flatten(grads)} == {
        k for k, _ in tree_flatten(model.trainable_parameters())
    }


@pytest.mark.parametrize("case", ["full", "topk", "chunk", "topk-chunk"])
def test_logged_losses_are_each_completions_own_loss(lora, monkeypatch, case):
    """--log-completions: the first rows' losses from the training pass equal each completion's loss
    scored alone (a batch of one, every token of it counted: a masked row too), 0 for a row with no
    token past --skip-first-tokens or none at all."""
    model, teacher, base = lora
    args = _args(num_generations=G, **{**OBJECTIVES[case], "skip_first_tokens": 1})
    pairs, completions, _ = _batch("mixed")
    _fixed_rollout(monkeypatch, completions, SCENARIOS["mixed"][1])
    objective = sdft_objective(args.objective)
    _, _, _, stats = train.sdft_step(
        model,
        teacher,
        PAIRS,
        [0, 1, 2],
        grad=True,
        timer=train.PhaseTimer(),
        args=args,
        stop_ids=[2],
        objective=objective,
        base=base,
        log=6,
    )
    logged = stats["completions"]
    assert [r["completion_ids"] for r in logged] == completions
    assert [r["masked"] for r in logged] == [False, True, False, False, False, False]
    for pair, ids, row in zip(pairs, completions, logged):
        with using(model, teacher):
            scores = objective.teacher_scores(model, [pair], [ids]) if ids else None
        alone = objective.student_loss(model, [pair], [ids], scores)[0].item() if ids else 0.0
        assert abs(row["loss"] - alone) <= 1e-5 * max(abs(alone), 1.0), (row, alone)
    assert logged[1]["loss"] > 0 and logged[3]["loss"] == logged[5]["loss"] == 0.0
