"""On-policy sampling: order, lengths, the kept stop token, truncation, seeding."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_sdft.core.rollout import fused_adapters, fused_bytes, fusable, sample

PROMPTS = [[1, 300, 201, 293], [1, 5, 9], [1, 300, 201, 293, 275, 289, 283]]


def _greedy_first_token(model, prompt):
    return int(mx.argmax(model(mx.array([prompt]))[0, -1]).item())


def test_stop_token_is_kept_in_the_completion(tiny):
    model, _ = tiny
    stop = _greedy_first_token(model, PROMPTS[0])
    # A near-zero temperature makes the first token the argmax, which we declare the stop token.
    r = sample(model, [PROMPTS[0]], [10], stop_ids=[stop], temperature=1e-6)
    assert r.completions == [[stop]]
    assert r.truncated == [False]


def test_truncation_and_lengths(tiny):
    model, _ = tiny
    r = sample(model, PROMPTS, [5, 3, 8], stop_ids=[])
    assert [len(c) for c in r.completions] == [5, 3, 8]
    assert r.truncated == [True, True, True]
    assert r.num_tokens == 16 and r.prompt_tokens == sum(map(len, PROMPTS))
    vocab = model.args.vocab_size
    assert all(0 <= t < vocab for c in r.completions for t in c)


def test_order_matches_prompts(tiny):
    model, _ = tiny
    # Greedy answers to distinct prompts, batched, must come back in the order given.
    one_by_one = [sample(model, [p], [6], [], temperature=1e-6).completions[0] for p in PROMPTS]
    batched = sample(model, PROMPTS, [6] * 3, [], temperature=1e-6).completions
    assert batched == one_by_one


def test_seeded_sampling_is_reproducible(tiny):
    model, _ = tiny
    mx.random.seed(3)
    a = sample(model, PROMPTS, [12] * 3, []).completions
    mx.random.seed(3)
    b = sample(model, PROMPTS, [12] * 3, []).completions
    mx.random.seed(4)
    c = sample(model, PROMPTS, [12] * 3, []).completions
    assert a == b and a != c


def test_sampling_restores_training_mode(tiny):
    model, _ = tiny
    model.train()
    sample(model, PROMPTS[:1], [2], [])
    assert model.training
    model.eval()


def test_seeded_sequences_do_not_depend_on_their_batch(tiny):
    # Data parallelism and resume split a step's prompts differently; each completion must not care.
    model, _ = tiny
    together = sample(model, PROMPTS, [10] * 3, [], seeds=[11, 12, 13]).completions
    apart = (
        sample(model, PROMPTS[:1], [10], [], seeds=[11]).completions
        + sample(model, PROMPTS[1:], [10] * 2, [], seeds=[12, 13]).completions
    )
    assert together == apart
    assert sample(model, PROMPTS[:1], [10], [], seeds=[99]).completions != together[:1]


def test_seeded_sampling_follows_the_temperature(tiny):
    # At a tiny temperature a seeded sampler is greedy.
    model, _ = tiny
    greedy = sample(model, PROMPTS, [6] * 3, [], temperature=0.0).completions
    assert (
        sample(model, PROMPTS, [6] * 3, [], temperature=1e-6, seeds=[1, 2, 3]).completions == greedy
    )


def _adapted(tiny_model, quantize=False):
    """The tiny model with LoRA on every linear and adapters far from zero (lora_b = 0 would
    make merging trivially exact)."""
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_sdft.formats.models import attach_adapters

    model, _ = load(str(tiny_model))
    if quantize:
        nn.quantize(model, group_size=32, bits=8)
    attach_adapters(model, "lora", -1, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.05
    mx.eval(model.parameters())
    return model


def test_fused_adapters_compute_the_same_function(tiny_model):
    model = _adapted(tiny_model)
    model.eval()
    x = mx.array([PROMPTS[2]])
    unmerged = model(x)
    before = dict(tree_flatten(model.trainable_parameters()))
    lora = fusable(model)
    assert len(lora) == 2 * 7 and fused_bytes(model) == sum(m.linear.weight.nbytes for _, m in lora)
    with fused_adapters(model):
        assert not fusable(model) and not tree_flatten(model.trainable_parameters())
        merged = model(x)
    assert mx.abs(merged - unmerged).max().item() < 1e-5 * mx.abs(unmerged).max().item()
    # The adapters come back as the same modules, still trainable and unchanged.
    assert [m for _, m in fusable(model)] == [m for _, m in lora]
    after = dict(tree_flatten(model.trainable_parameters()))
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_merged_sampling_draws_the_same_tokens(tiny_model):
    model = _adapted(tiny_model)
    seeds = [11, 12, 13]
    merged = sample(model, PROMPTS, [12] * 3, [], seeds=seeds)
    plain = sample(model, PROMPTS, [12] * 3, [], seeds=seeds, fuse=False)
    assert merged.completions == plain.completions
    # The adapters matter here: the adapters-off model answers differently.
    assert fusable(model)


def test_adapters_over_quantized_weights_are_not_merged(tiny_model):
    model = _adapted(tiny_model, quantize=True)
    assert fusable(model) == [] and fused_bytes(model) == 0
    with fused_adapters(model):  # nothing to merge: a no-op
        assert all(type(m).__name__ != "FusedLinear" for _, m in model.named_modules())


def _paths(model, prompts, max_tokens, stops, monkeypatch, **kw):
    """The same sampling through decode.decode and through mlx-lm's BatchGenerator."""
    from mlx_sdft.core import decode

    assert decode.supported(model)
    fast = sample(model, prompts, max_tokens, stops, **kw)
    with monkeypatch.context() as m:
        m.setattr(decode, "supported", lambda model: False)
        fallback = sample(model, prompts, max_tokens, stops, **kw)
    return fast, fallback


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_decode_loop_and_batch_generator_draw_the_same_tokens(tiny_model, monkeypatch, top_p):
    model = _adapted(tiny_model)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]  # the copy shares its prefill
    seeds, budget = [31, 32, 33, 34], [12, 7, 12, 12]
    free, free_fallback = _paths(model, prompts, budget, [], monkeypatch, seeds=seeds, top_p=top_p)
    assert free.completions == free_fallback.completions and free.truncated == [True] * 4
    assert [len(c) for c in free.completions] == budget and free.completions[0] != free.completions[
        3
    ]
    # Stop tokens end rows at different steps; each stopped row is a prefix of its free run.
    stops = [free.completions[0][2], free.completions[2][5]]
    stopped, stopped_fallback = _paths(
        model, prompts, budget, stops, monkeypatch, seeds=seeds, top_p=top_p
    )
    assert (
        stopped.completions == stopped_fallback.completions
        and stopped.truncated == stopped_fallback.truncated
    )
    for row, c in enumerate(stopped.completions):
        first = next((i for i, t in enumerate(free.completions[row]) if t in stops), None)
        assert c == free.completions[row][: budget[row] if first is None else first + 1]
        assert stopped.truncated[row] == (first is None)
    assert not stopped.truncated[0]


def test_greedy_decoding_matches_batch_generator(tiny_model, monkeypatch):
    model = _adapted(tiny_model)
    fast, fallback = _paths(model, PROMPTS, [9, 4, 9], [], monkeypatch, temperature=0.0)
    assert fast.completions == fallback.completions


def test_decode_loop_is_used_only_for_plain_kv_caches(tiny_model):
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_sdft.core import decode

    model = _adapted(tiny_model)
    assert decode.supported(model)
    model.make_cache = lambda: [
        RotatingKVCache(max_size=16) for _ in model.layers
    ]  # e.g. sliding windows
    assert not decode.supported(model)
    assert [len(c) for c in sample(model, PROMPTS, [5, 5, 5], []).completions] == [
        5,
        5,
        5,
    ]  # via BatchGenerator


def test_repeated_prompts_share_one_prefill_in_batch_generator_too(tiny_model, monkeypatch):
    from mlx_sdft.core import decode
    from mlx_sdft.core import rollout

    model = _adapted(tiny_model)
    monkeypatch.setattr(decode, "supported", lambda model: False)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2  # --num-generations 3 and 2
    seeds = [21, 22, 23, 24, 25]
    inputs, caches = rollout.shared_prefill(model, prompts)
    assert (
        inputs == [[p[-1]] for p in prompts] and caches[0] is caches[2] and caches[3] is caches[4]
    )
    assert caches[0][0].offset == len(PROMPTS[0]) - 1 and caches[3][0].offset == len(PROMPTS[2]) - 1
    shared = sample(model, prompts, [10] * 5, [], seeds=seeds)
    monkeypatch.setattr(rollout, "shared_prefill", lambda model, prompts: (prompts, None))
    separate = sample(model, prompts, [10] * 5, [], seeds=seeds)
    assert shared.completions == separate.completions
    assert shared.completions[0] != shared.completions[1]  # copies draw their own samples
    assert rollout.shared_prefill(model, PROMPTS) == (
        PROMPTS,
        None,
    )  # nothing repeats: nothing shared


def test_distinct_rows():
    from mlx_sdft.core.decode import distinct_rows

    assert distinct_rows([[1, 2], [3], [1, 2], [3], [4]]) == ([[1, 2], [3], [4]], [0, 1, 0, 1, 2])


def test_keyed_draws_follow_the_distribution():
    """The vectorised per-row sampler draws from softmax(logprobs / temperature): 4000 rows, each
    with its own key, against the exact probabilities (±4.5 standard errors)."""
    import numpy as np

    from mlx_sdft.core.decode import draw, row_keys

    p = np.array([0.5, 0.25, 0.15, 0.1])
    for temperature in (1.0, 0.5):
        logprobs_BV = mx.broadcast_to(mx.array(np.log(p), dtype=mx.float32), (4000, 4))
        tokens, _ = draw(logprobs_BV, row_keys(list(range(4000))), temperature, 1.0)
        want = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
        got = np.bincount(np.array(tokens), minlength=4) / 4000
        assert np.all(np.abs(got - want) < 4.5 * np.sqrt(want * (1 - want) / 4000)), (got, want)


def test_decode_edge_cases_match_batch_generator(tiny_model, monkeypatch):
    """One-token prompts (nothing to prefill), a budget of one token, and copies of a one-token
    prompt, through both paths."""
    model = _adapted(tiny_model)
    prompts = [[1], PROMPTS[2], [1], PROMPTS[1]]
    for budget in ([1, 1, 1, 1], [3, 1, 5, 2]):
        fast, fallback = _paths(model, prompts, budget, [], monkeypatch, seeds=[1, 2, 3, 4])
        assert [len(c) for c in fast.completions] == budget
        assert fast.completions == fallback.completions
    greedy, greedy_fallback = _paths(model, [[1], [1]], [4, 4], [], monkeypatch, temperature=0.0)
    assert (
        greedy.completions == greedy_fallback.completions
        and greedy.completions[0] == greedy.completions[1]
    )
