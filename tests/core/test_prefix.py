"""One prefill per prompt, several continuations (core/prefix.py): the values and the gradients of
every objective equal those of the full pass over every row, which is what the code did before
(and still does where the model does not share: `prefix.shares` False)."""

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.lora import LoRALinear

from mlx_sdft.config import Config
from mlx_sdft.core import decode, guards, prefix, scoring
from mlx_sdft.core.losses import sdft_loss
from mlx_sdft.core.objective import ObjectiveArgs, sdft_objective, supervised_loss
from mlx_sdft.core.prompts import PromptPair
from mlx_sdft.core.teacher import checkpointing, trainable_leaves, using
from mlx_sdft.formats.models import Adapters, open_model

# Ragged prompts (a one-token one too), a feedback lesson (no demonstration) among them.
PAIRS = [
    PromptPair([1, 5, 9, 13, 2, 7], [1, 5, 9, 13, 2, 7, 30, 31, 32, 7], [50, 51, 52, 2], "t:1"),
    PromptPair([300], [300, 201, 40, 41, 7], [60, 61, 62, 63, 64, 65, 2], "t:2"),
    PromptPair([4, 8, 15, 16, 23, 42, 99, 101, 7], [4, 8, 7], [2], "t:3", demonstrated=False),
]
# The same lessons behind a common beginning (a chat template's system prompt): prompts that differ
# only after it, one of them the common prefix plus one token, a one-token remainder in each side.
SYSTEM = [1, 17, 18, 19, 20]
COMMON_PAIRS = [
    PromptPair(
        SYSTEM + [5, 9, 13, 2, 7], SYSTEM + [5, 9, 13, 2, 7, 30, 31, 32, 7], [50, 51, 52, 2], "t:1"
    ),
    PromptPair(SYSTEM + [300], SYSTEM + [300, 201, 40, 41, 7], [60, 61, 62, 63, 64, 65, 2], "t:2"),
    PromptPair(
        SYSTEM + [8, 15, 16, 23, 42, 99, 101, 7], SYSTEM + [8], [2], "t:3", demonstrated=False
    ),
]
# Per prompt, up to three completions of ragged lengths, one of a single token.
COMPLETIONS = [
    [[11, 12, 2], [40, 41, 42, 43, 44], [7]],
    [[8, 9, 10, 11, 12, 13, 14, 2], [20, 2], [21, 22, 23]],
    [[30, 31], [32], [33, 34, 35, 36, 37, 38]],
]


@pytest.fixture(scope="module")
def lora(tiny_model):
    """The tiny model with LoRA adapters on every block, all of them non-zero; teacher leaves of
    their own; the base leaves (adapters off) for --base-kl-weight."""
    mx.random.seed(
        3
    )  # before the adapters' random initialisation: the same model in any test order
    model, base = open_model(tiny_model, adapters=Adapters("lora", -1, Config().lora_parameters))
    noise = lambda leaves, s: {k: v + s * mx.random.normal(v.shape) for k, v in leaves.items()}  # noqa: E731
    model.load_weights(list(noise(trainable_leaves(model), 0.05).items()), strict=False)
    model.train()
    return model, noise(trainable_leaves(model), 0.05), base


def _batch(G: int, lessons=PAIRS):
    pairs = [p for p in lessons for _ in range(G)]
    completions = [c for cs in COMPLETIONS for c in cs[:G]]
    # Completion 0 (demonstrated) truncated: masked under --truncated mask; the feedback lesson's last
    # completion truncated too, which the mask leaves in (guards.maskable).
    truncated = [i == 0 or i == len(pairs) - 1 for i in range(len(pairs))]
    return pairs, completions, guards.maskable(truncated, [p.demonstrated for p in pairs])


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert np.linalg.norm(a - b) <= rel * max(np.linalg.norm(a), 1e-12), (a, b)


def _both_passes(model, prompts, continuations, weights_BTD, mask_BT1):
    """[(value, grads) of Σ hidden · weights over the real positions] with the shared prefill, then
    with the full pass (scoring.completion_hidden)."""

    def total(model, hidden):
        return (hidden(model, prompts, continuations) * weights_BTD * mask_BT1).sum()

    return [
        nn.value_and_grad(model, lambda m, h=h: total(m, h))(model)
        for h in (prefix.completion_hidden, scoring.completion_hidden)
    ]


def _close_grads(a, b):
    for (_, x), (_, y) in zip(tree_flatten(a), tree_flatten(b)):
        _close(x, y)


def _score(model, teacher, base, args, pairs, completions, truncated):
    """Teacher scores, then the student loss's value, ntoks, parts and gradient, as sdft_step runs them."""
    objective = sdft_objective(args)
    with using(model, teacher):
        scores = objective.teacher_scores(model, pairs, completions)
    guard = guards.Guard(
        truncated,
        guards.base_logits(model, base, pairs, completions) if args.base_kl_weight else None,
    )
    with checkpointing(model, args.grad_checkpoint):
        (loss, ntoks, parts, _), grads = nn.value_and_grad(model, objective.student_loss)(
            model, pairs, completions, scores, guard
        )
    mx.eval(scores, loss, grads)
    return scores, loss, ntoks, parts, grads, guard


def _valid(scores, completions):
    """Each [B, T, ...] score array cut to the real completion tokens, flattened."""
    return [
        np.concatenate([np.array(a[i, : len(c)]).ravel() for i, c in enumerate(completions)])
        for a in (scores if isinstance(scores, tuple) else (scores,))
    ]


CASES = {
    "defaults": {},
    "topk": {"topk": 8},
    "chunk": {"logits_chunk": 2},
    "topk-chunk": {"topk": 8, "logits_chunk": 3},
    "base-kl": {"base_kl_weight": 0.3, "divergence": "reverse"},
    "jsd-skip-no-sft": {
        "divergence": "jsd",
        "skip_first_tokens": 1,
        "sft_weight": 0.0,
        "truncated": "keep",
    },
    "grad-checkpoint": {"grad_checkpoint": True},
}


def _count_common(monkeypatch) -> list[int]:
    """Records the length of every common prefix run (a batch-1 cache filled from slot 0 whose
    keys go to the rows' caches; one entry per layer)."""
    runs, update = [], prefix.PrefixCache.update_and_fetch

    def counted(self, keys, values):
        if (
            self._idx == 0
            and self.start == 0
            and keys.shape[0] == 1
            and self.left_padding.size == 1
        ):
            runs.append(keys.shape[2])
        return update(self, keys, values)

    monkeypatch.setattr(prefix.PrefixCache, "update_and_fetch", counted)
    return runs


@pytest.mark.parametrize("lessons", ["distinct", "common"])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_shared_prefill_equals_the_full_pass(lora, monkeypatch, case, G, lessons):
    model, teacher, base = lora
    args = ObjectiveArgs.of(Config(model="x", data="-", num_generations=G, **CASES[case]))
    pairs, completions, truncated = _batch(G, PAIRS if lessons == "distinct" else COMMON_PAIRS)
    copies, runs = [], _count_common(monkeypatch)
    monkeypatch.setattr(
        prefix.PrefixCache,
        "rows",
        lambda self, index, rows=prefix.PrefixCache.rows: (
            copies.append(index.shape[0]),
            rows(self, index),
        )[1],
    )
    shared = _score(model, teacher, base, args, pairs, completions, truncated)
    # The path was taken wherever a prompt repeats: the teacher's with G > 1, the student's with G > 1
    # or an SFT term, and not under --grad-checkpoint (the student side falls back); with a common
    # prefix, in every pass (teacher, student, base), its SYSTEM tokens run once, at batch 1.
    if lessons == "distinct":
        repeats = (
            (G > 1)
            + (G > 1 or args.sft_weight > 0) * (not args.grad_checkpoint)
            + (G > 1) * (args.base_kl_weight > 0)
        )
        assert not runs
    else:
        repeats = 1 + (not args.grad_checkpoint) + (args.base_kl_weight > 0)
        assert runs == [len(SYSTEM)] * repeats * model.args.num_hidden_layers
    assert len(copies) == repeats * model.args.num_hidden_layers
    copies.clear()
    monkeypatch.setattr(prefix, "shares", lambda model: False)
    full = _score(model, teacher, base, args, pairs, completions, truncated)
    # Rounding alone: the full pass over the rows in reverse order (with JSD and a skipped token the
    # gradient cancels enough that this alone reaches ~1e-5; see the tolerance below).
    control = _score(model, teacher, base, args, pairs[::-1], completions[::-1], truncated[::-1])
    assert not copies
    for a, b in zip(_valid(shared[0], completions), _valid(full[0], completions)):
        if a.dtype.kind == "i":  # the teacher's top-K token ids
            np.testing.assert_array_equal(a, b)
        else:
            _close(a, b)
    if args.base_kl_weight:
        _close(*(_valid(r[5].base_logits, completions)[0] for r in (shared, full)))
    _close(shared[1], full[1])
    assert shared[2].item() == full[2].item()
    assert shared[3].keys() == full[3].keys()
    for k in shared[3]:
        _close(shared[3][k], full[3][k])
    for (k, a), (_, b), (_, c) in zip(
        tree_flatten(shared[4]), tree_flatten(full[4]), tree_flatten(control[4])
    ):
        assert np.abs(np.array(a)).max() > 0, k  # every adapter leaf gets a gradient
        # The file's 1e-5, or 4x the rounding of the full pass against itself where that is larger.
        _close(a, b, rel=max(1e-5, 4 * _rel(c, b)))


def test_the_full_pass_is_the_objective_as_written(lora, monkeypatch):
    """The reference above is the SDFT loss plus the SFT term as the code computed them before:
    completion logits of student and teacher over every row, cross-entropy on the demonstrations."""
    model, teacher, _ = lora
    args = ObjectiveArgs.of(Config(model="x", data="-", num_generations=3))
    pairs, completions, truncated = _batch(3)
    _, loss, ntoks, parts, _, _ = _score(model, teacher, None, args, pairs, completions, truncated)
    student_BTV = (
        scoring.completion_logits(model, [p.student_ids for p in pairs], completions)
        / args.temperature
    )
    with using(model, teacher):
        teacher_BTV = (
            scoring.completion_logits(model, [p.teacher_ids for p in pairs], completions)
            / args.temperature
        )
    mask_BT = guards.keep_rows(
        scoring.completion_mask([len(c) for c in completions]), truncated, "mask"
    )
    divergence, n = sdft_loss(
        student_BTV, teacher_BTV, mask_BT, divergence=args.divergence, skip=0, beta=args.beta
    )
    sft, sft_n = supervised_loss(model, [p for p in PAIRS if p.demonstrated], args)
    _close(loss, divergence + args.sft_weight * sft)
    _close(parts["sdft_loss"], divergence)
    _close(parts["sft_loss"], sft)
    assert ntoks.item() == n.item() + sft_n.item() > 0


def test_continuations_of_one_prompt_share_its_prefill_exactly(lora):
    """prefix.completion_hidden against scoring.completion_hidden, row by row, values and gradients:
    ragged prompts, a one-token prompt, single-token continuations, copies in any order."""
    model, _, _ = lora
    prompts = [
        PAIRS[0].student_ids,
        PAIRS[1].student_ids,
        PAIRS[0].student_ids,
        PAIRS[2].student_ids,
        PAIRS[1].student_ids,
    ]
    continuations = [[11, 12, 2], [7], [40, 41, 42, 43, 44, 45], [9, 9], [30, 31, 32]]
    mask_BT = scoring.completion_mask([len(c) for c in continuations])[..., None]
    weights_BTD = mx.random.normal((5, 6, model.args.hidden_size), key=mx.random.key(0))

    (shared, shared_grads), (full, full_grads) = _both_passes(
        model, prompts, continuations, weights_BTD, mask_BT
    )
    # A sum of terms of both signs: its rounding is relative to the terms' size, not to the sum's.
    scale = (
        (mx.abs(scoring.completion_hidden(model, prompts, continuations) * weights_BTD) * mask_BT)
        .sum()
        .item()
    )
    assert abs(shared.item() - full.item()) <= 1e-6 * scale
    _close(
        prefix.completion_hidden(model, prompts, continuations) * mask_BT,
        scoring.completion_hidden(model, prompts, continuations) * mask_BT,
    )
    _close_grads(shared_grads, full_grads)
    one = prefix.completion_hidden(
        model, prompts, [[5]] * 5
    )  # every continuation one token: no second call
    _close(one, scoring.completion_hidden(model, prompts, [[5]] * 5))


@pytest.mark.parametrize("repeats", [False, True])
def test_a_common_prefix_runs_once_at_batch_one(lora, monkeypatch, repeats):
    """Prompts that begin alike: their common prefix enters the cache once (batch 1, its length),
    each distinct prompt's remainder once (ragged: 1, 2, 5 and 8 tokens, padded to the longest), and
    the hidden states and gradients equal the full pass's."""
    model, _, _ = lora
    distinct = [
        SYSTEM + [300],
        SYSTEM + [4, 8],
        SYSTEM + [6, 7, 8, 9, 10],
        SYSTEM + [1, 5, 9, 13, 2, 7, 30, 31],
    ]
    prompts = [distinct[i] for i in ([0, 1, 2, 3, 1, 0] if repeats else [0, 1, 2, 3])]
    continuations = [[11, 12, 2], [7], [40, 41, 42, 43, 44, 45], [9, 9], [30, 31, 32], [5, 6]][
        : len(prompts)
    ]
    mask_BT1 = scoring.completion_mask([len(c) for c in continuations])[..., None]
    weights_BTD = mx.random.normal((len(prompts), 6, model.args.hidden_size), key=mx.random.key(2))
    runs, update = [], prefix.PrefixCache.update_and_fetch
    monkeypatch.setattr(
        prefix.PrefixCache,
        "update_and_fetch",
        lambda self, k, v: (runs.append((k.shape[0], k.shape[2], self._idx)), update(self, k, v))[
            1
        ],
    )

    (shared, shared_grads), (full, full_grads) = _both_passes(
        model, prompts, continuations, weights_BTD, mask_BT1
    )
    P, layers = len(SYSTEM), model.args.num_hidden_layers
    # Per layer: the common prefix (1 row), the remainders (4 rows from slot P), the continuations;
    # nothing from the full pass, which uses no PrefixCache.
    assert runs == [(1, P, 0)] * layers + [(4, 8, P)] * layers + [(len(prompts), 5, P + 8)] * layers
    scale = (
        (mx.abs(scoring.completion_hidden(model, prompts, continuations) * weights_BTD) * mask_BT1)
        .sum()
        .item()
    )
    assert abs(shared.item() - full.item()) <= 1e-6 * scale
    _close(
        prefix.completion_hidden(model, prompts, continuations) * mask_BT1,
        scoring.completion_hidden(model, prompts, continuations) * mask_BT1,
    )
    _close_grads(shared_grads, full_grads)


def test_the_common_prefix_leaves_every_prompt_a_token_of_its_own():
    assert (
        decode.common_length([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3]]) == 2
    )  # [1, 2, 3] keeps its 3
    assert decode.common_length([[1, 2, 3, 4], [1, 2, 3, 4, 5]]) == 3
    assert (
        decode.common_length([[1, 2, 9], [1, 2, 8], [1, 3]]) == 0
    )  # one token in common: not worth it
    assert decode.common_length([[1, 2, 3, 4]]) == 0  # one prompt: nothing to share
    assert decode.common_length([[5, 6], [7, 6]]) == 0
    assert (
        decode.common_length([[1, 2, 3, 4, 5], [], [1, 2, 3, 9, 9]]) == 0
    )  # was 3: [][:-1] sliced from the end


def test_the_gap_after_a_common_prefix_is_hidden_from_every_query():
    """Rows padded between a common prefix of 3 slots and their remainders (2, 0 and 1 slots): a
    real query sees what mlx-lm's left-padded mask shows it with the gap moved to the front (the
    prefix and its own row's earlier tokens), a padded query the prefix and itself; no query sees
    another's gap slot."""
    from mlx_lm.models.cache import BatchKVCache

    P, pad = 3, [2, 0, 1]
    cache = prefix.PrefixCache(pad, P)
    cache.update_and_fetch(mx.zeros((3, 1, P, 2)), mx.zeros((3, 1, P, 2)))
    for N in (4, 2):  # the remainders, then continuations after them
        start, K = cache._idx, cache._idx + N
        mask_BQK = np.array(cache.make_mask(N))[:, 0]
        their_BQK = np.array(BatchKVCache(pad).make_mask(K))[
            :, 0, -N:
        ]  # all K slots, the last N queries
        for b, n in enumerate(pad):
            gap = list(range(P, P + n))
            order = gap + [k for k in range(K) if k not in gap]  # the gap moved to the front
            for q in range(N):
                seen = set(np.flatnonzero(mask_BQK[b, q]))
                if start + q in gap:  # a padded query: the prefix and itself
                    assert seen == set(range(P)) | {start + q}
                else:
                    assert not seen & set(gap)
                    np.testing.assert_array_equal(mask_BQK[b, q][order], their_BQK[b, q])
        cache.update_and_fetch(mx.zeros((3, 1, N, 2)), mx.zeros((3, 1, N, 2)))


def test_copies_of_a_cache_share_nothing():
    cache = prefix.PrefixCache([1, 0])
    keys = mx.arange(2 * 1 * 3 * 2, dtype=mx.float32).reshape(2, 1, 3, 2)
    cache.update_and_fetch(keys, keys)
    a, b = cache.rows(mx.array([1, 1])), cache.rows(mx.array([1]))
    a.update_and_fetch(mx.ones((2, 1, 2, 2)), mx.ones((2, 1, 2, 2)))
    assert (
        cache.keys.shape == (2, 1, 3, 2)
        and b.keys.shape == (1, 1, 3, 2)
        and a.keys.shape == (2, 1, 5, 2)
    )
    np.testing.assert_array_equal(np.array(b.keys[0]), np.array(keys[1]))
    assert (
        a.offset.tolist() == [5, 5] and b.offset.tolist() == [3] and cache.offset.tolist() == [2, 3]
    )
    assert a.left_padding.tolist() == [0, 0] and cache.left_padding.tolist() == [1, 0]


def test_a_model_whose_head_does_not_split_takes_the_full_pass(lora, monkeypatch):
    model, _, _ = lora
    monkeypatch.setattr(scoring, "_HEAD_SPLIT", set())
    assert not prefix.shares(model)
    prompts, completions = [PAIRS[0].student_ids] * 2, [[3, 4], [5]]
    got, none = prefix.grouped(model, [(prompts, completions), ([], [])])
    assert none is None
    _close(got, scoring.completion_logits(model, prompts, completions))


def test_every_query_sees_a_key_and_real_queries_see_what_mlx_lm_shows_them():
    """The prefill's mask: a padded query sees its own key only (never no key at all, which some
    backends' softmax turns into NaN), real queries exactly mlx-lm's left-padded causal mask."""
    from mlx_lm.models.cache import BatchKVCache

    cache, theirs = prefix.PrefixCache([2, 0]), BatchKVCache([2, 0])
    mask_BQK, their_BQK = np.array(cache.make_mask(4)), np.array(theirs.make_mask(4))
    assert mask_BQK.any(axis=-1).all()
    np.testing.assert_array_equal(mask_BQK[0, 0, 2:], their_BQK[0, 0, 2:])  # row 0's real queries
    np.testing.assert_array_equal(mask_BQK[1], their_BQK[1])  # row 1 has no padding
    np.testing.assert_array_equal(mask_BQK[0, 0, :2], np.eye(2, 4, dtype=bool))  # padded: itself
    cache.update_and_fetch(mx.zeros((2, 1, 4, 2)), mx.zeros((2, 1, 4, 2)))
    theirs.update_and_fetch(mx.zeros((2, 1, 4, 2)), mx.zeros((2, 1, 4, 2)))
    np.testing.assert_array_equal(
        np.array(cache.make_mask(3)), np.array(theirs.make_mask(3))
    )  # continuations


@pytest.mark.parametrize("lessons", ["distinct", "common"])
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "olmo2", "smollm3"])
def test_every_model_type_that_shares_equals_its_full_pass(model_type, lessons):
    """The other head-splitting types (llama above): tiny random models with non-zero LoRA on the
    query and value projections, hidden states and adapter gradients equal to the full pass."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = module.ModelArgs.from_dict(
        {
            "model_type": model_type,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "rms_norm_eps": 1e-5,
            "vocab_size": 400,
            "tie_word_embeddings": True,
            "rope_theta": 10000.0,
            "max_position_embeddings": 4096,
            "no_rope_layer_interval": 2,
        }
    )
    mx.random.seed(0)
    model = module.Model(args)
    model.freeze()
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            lora = LoRALinear.from_base(getattr(layer.self_attn, name), r=4)
            lora.lora_b = mx.random.normal(lora.lora_b.shape) * 0.1
            setattr(layer.self_attn, name, lora)
    assert prefix.shares(model)
    lessons = PAIRS if lessons == "distinct" else COMMON_PAIRS
    prompts = [
        p
        for p in (lessons[0].student_ids, lessons[1].student_ids, lessons[2].student_ids)
        for _ in range(2)
    ]
    continuations = [c for cs in COMPLETIONS for c in cs[:2]]
    mask_BT1 = scoring.completion_mask([len(c) for c in continuations])[..., None]
    weights_BTD = mx.random.normal(
        (len(continuations), max(map(len, continuations)), 64), key=mx.random.key(1)
    )

    (shared, shared_grads), (full, full_grads) = _both_passes(
        model, prompts, continuations, weights_BTD, mask_BT1
    )
    _close(shared, full)
    _close_grads(shared_grads, full_grads)
