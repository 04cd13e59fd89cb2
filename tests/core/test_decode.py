"""The decode loop's shortcuts draw exactly the tokens of the plain loop: the
compiled sampling step, and no attention mask for decode steps of unpadded batches."""

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.models.cache import BatchKVCache

from mlx_sdft.core import decode
from mlx_sdft.core.rollout import sample

EQUAL = [[1, 300, 201, 293], [1, 5, 9, 7], [1, 300, 201, 293]]  # one length: no row is padded
RAGGED = [[1, 300, 201, 293, 275], [1, 5], [1, 9, 7]]


@pytest.fixture(scope="module")
def model(tiny_model):
    model, _ = load(str(tiny_model))
    model.eval()
    return model


def _plain(monkeypatch):
    """The loop without any shortcut: sampling not compiled, the mask always built."""
    monkeypatch.setattr(decode, "next_tokens_compiled", decode.next_tokens)
    monkeypatch.setattr(decode.DecodeCache, "make_mask", BatchKVCache.make_mask)


@pytest.mark.parametrize("prompts", [EQUAL, EQUAL[:1], RAGGED], ids=["equal", "one", "ragged"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_shortcuts_draw_the_tokens_of_the_plain_loop(
    model, monkeypatch, prompts, temperature, top_p
):
    budget = [9, 4, 12][: len(prompts)]  # rows leave the batch at different steps: it shrinks
    seeds = [5, 6, 7][: len(prompts)]
    fast = sample(model, prompts, budget, [], temperature=temperature, top_p=top_p, seeds=seeds)
    with monkeypatch.context() as m:
        _plain(m)
        plain = sample(
            model, prompts, budget, [], temperature=temperature, top_p=top_p, seeds=seeds
        )
    assert fast.completions == plain.completions and [len(c) for c in fast.completions] == budget
    if temperature and len(prompts) > 2:
        assert fast.completions[0] != fast.completions[2]  # a copy draws its own tokens


def test_both_shortcuts_are_taken(model, monkeypatch):
    """Not a vacuous comparison: the compiled sampling step runs, and unpadded decode steps get
    no mask."""
    calls, masks = [], []
    compiled = decode.next_tokens_compiled
    monkeypatch.setattr(
        decode, "next_tokens_compiled", lambda *a: calls.append(a[0].shape) or compiled(*a)
    )
    real = decode.DecodeCache.make_mask
    monkeypatch.setattr(
        decode.DecodeCache,
        "make_mask",
        lambda self, N, **kw: masks.append((N, self.padded, m := real(self, N, **kw))) or m,
    )
    sample(model, RAGGED, [6, 2, 4], [], seeds=[1, 2, 3])
    assert (
        calls[0] == (3, model.args.vocab_size) and (1, model.args.vocab_size) in calls
    )  # the batch shrinks
    assert all((m is None) == (N == 1 and not padded) for N, padded, m in masks)
    # The two short rows were padded; once they leave, the long row decodes without a mask.
    assert any(m is None for *_, m in masks) and any(N == 1 and m is not None for N, _, m in masks)


def test_unmasked_decode_step_computes_the_same_logits(model):
    """One decode step of an unpadded batch with and without the all-true mask."""
    prompts = mx.array(EQUAL)
    outs = []
    for cls in (decode.DecodeCache, BatchKVCache):
        cache = [cls([0] * len(EQUAL)) for _ in model.layers]
        model(prompts, cache=cache)
        outs.append(model(mx.array([[3], [4], [5]]), cache=cache))
    assert mx.array_equal(outs[0], outs[1]).item()


COMMON = [1] + [(7 * i) % 300 + 3 for i in range(40)]  # a template header and system prompt, say
SHARING = {  # distinct prompts after one long common prefix: ragged, equal, and nothing left but the last token
    "ragged": [
        COMMON + [5, 9, 7, 11],
        COMMON + [300],
        COMMON + [8, 8, 201, 17, 42, 99, 3],
        COMMON + [5, 9, 7, 11],
    ],
    "equal": [COMMON + [5, 9], COMMON + [6, 2]],
    "last token only": [COMMON + [5], COMMON + [9], COMMON + [9, 4]],
}


@pytest.fixture
def prefills(monkeypatch):
    """The shape of every input the prefill runs through the model."""
    seen, real = [], decode.prefill_body
    monkeypatch.setattr(
        decode,
        "prefill_body",
        lambda model: (
            lambda inputs, cache: seen.append(inputs.shape) or real(model)(inputs, cache=cache)
        ),
    )
    return seen


@pytest.mark.parametrize("case", SHARING)
@pytest.mark.parametrize(
    "temperature,top_p,seeds",
    [(1.0, 1.0, [5, 6, 7, 8]), (0.7, 0.9, [5, 6, 7, 8]), (0.0, 1.0, None)],
    ids=["seeded", "top-p", "greedy"],
)
def test_a_shared_common_prefix_draws_the_tokens_of_the_unshared_prefill(
    model, monkeypatch, prefills, case, temperature, top_p, seeds
):
    """The distinct prompts' common prefix runs once at batch 1 and each remainder continues from
    a copy of it: every row samples the tokens it samples when each prompt is prefilled whole."""
    prompts = SHARING[case]
    budget, seeds = [14, 9, 14, 11][: len(prompts)], seeds and seeds[: len(prompts)]
    shared = sample(model, prompts, budget, [], temperature=temperature, top_p=top_p, seeds=seeds)
    distinct = len({tuple(p) for p in prompts})
    remainder = max(map(len, prompts)) - 1 - len(COMMON)
    assert prefills == [(1, len(COMMON))] + [(distinct, remainder)] * bool(remainder)
    monkeypatch.setattr(decode, "common_length", lambda prompts: 0)
    whole = sample(model, prompts, budget, [], temperature=temperature, top_p=top_p, seeds=seeds)
    assert prefills[-1] == (distinct, len(COMMON) + remainder)
    assert (
        shared.completions == whole.completions and [len(c) for c in shared.completions] == budget
    )


@pytest.mark.parametrize("case", SHARING)
def test_a_shared_common_prefix_leaves_the_cache_of_the_unshared_prefill(model, monkeypatch, case):
    """Same layout (mlx-lm's left padding, per-row offsets) and the same next-token logits to
    rounding (bit for bit on this CPU), so every decode step runs as it would unshared."""
    distinct, _ = decode.distinct_rows(SHARING[case])
    shared = decode._prefill(model, distinct, 512)
    with monkeypatch.context() as m:
        m.setattr(decode, "common_length", lambda prompts: 0)
        whole = decode._prefill(model, distinct, 512)
    for a, b in zip(shared, whole):
        assert (a._idx, a.left_padding.tolist(), a.offset.tolist(), a.padded) == (
            b._idx,
            b.left_padding.tolist(),
            b.offset.tolist(),
            b.padded,
        )
    last = mx.array([[p[-1]] for p in distinct])
    assert mx.allclose(
        model(last, cache=shared), model(last, cache=whole), atol=1e-5, rtol=1e-5
    ).item()
