"""On-policy sampling: order, lengths, the kept stop token, truncation, seeding."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_sdft.rollout import fused_adapters, fused_bytes, fusable, sample

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
    apart = sample(model, PROMPTS[:1], [10], [], seeds=[11]).completions + \
        sample(model, PROMPTS[1:], [10] * 2, [], seeds=[12, 13]).completions
    assert together == apart
    assert sample(model, PROMPTS[:1], [10], [], seeds=[99]).completions != together[:1]


def test_seeded_sampling_follows_the_temperature(tiny):
    # At a tiny temperature a seeded sampler is greedy.
    model, _ = tiny
    greedy = sample(model, PROMPTS, [6] * 3, [], temperature=0.0).completions
    assert sample(model, PROMPTS, [6] * 3, [], temperature=1e-6, seeds=[1, 2, 3]).completions == greedy


def _adapted(tiny_model, quantize=False):
    """The tiny model with LoRA on every linear and adapters far from zero (lora_b = 0 would
    make merging trivially exact)."""
    from mlx_lm import load
    from mlx_lm.tuner.lora import LoRALinear

    from mlx_sdft.models import attach_adapters

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


def test_repeated_prompts_share_one_prefill_and_sample_the_same(tiny_model, monkeypatch):
    from mlx_sdft import rollout

    model = _adapted(tiny_model)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 2  # --num-generations 3 and 2
    seeds = [21, 22, 23, 24, 25]
    inputs, caches = rollout.shared_prefill(model, prompts)
    assert inputs == [[p[-1]] for p in prompts] and caches[0] is caches[2] and caches[3] is caches[4]
    assert caches[0][0].offset == len(PROMPTS[0]) - 1 and caches[3][0].offset == len(PROMPTS[2]) - 1
    shared = sample(model, prompts, [10] * 5, [], seeds=seeds)
    monkeypatch.setattr(rollout, "shared_prefill", lambda model, prompts: (prompts, None))
    separate = sample(model, prompts, [10] * 5, [], seeds=seeds)
    assert shared.completions == separate.completions
    assert shared.completions[0] != shared.completions[1]  # copies draw their own samples
    assert rollout.shared_prefill(model, PROMPTS) == (PROMPTS, None)  # nothing repeats: nothing shared
