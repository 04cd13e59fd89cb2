"""On-policy sampling: order, lengths, the kept stop token, truncation, seeding."""

import mlx.core as mx

from mlx_sdft.rollout import sample

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
