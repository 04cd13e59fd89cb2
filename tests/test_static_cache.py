"""The compiled decode step over a fixed-length cache (`static_cache`, issue 18) draws exactly
the tokens of the plain loop over mlx-lm's growing cache, and computes the same logits."""

import importlib

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.tuner.lora import LoRALinear

from mlx_sdft.core import decode, static_cache
from mlx_sdft.core.rollout import sample
from mlx_sdft.formats.models import attach_adapters

EQUAL = [[1, 300, 201, 293], [1, 5, 9, 7], [1, 300, 201, 293]]
RAGGED = [[1, 300, 201, 293, 275], [1, 5], [1, 9, 7]]
# Prompt width + budget crosses the buffer's rounding step: the buffer is two steps long.
CROSSING = [[1] + [(7 * i) % 300 + 3 for i in range(static_cache.STEP - 4)], [1, 5, 9]]
LONG = [[1] + [(5 * i) % 300 + 3 for i in range(static_cache.STEP + 40)], [1, 9, 7]]  # wider than a step


@pytest.fixture(scope="module")
def model(tiny_model):
    model, _ = load(str(tiny_model))
    model.eval()
    return model


@pytest.fixture
def steps(monkeypatch):
    """(batch rows, buffer length) of every compiled decode step."""
    seen, real = [], static_cache.CompiledDecode.step
    monkeypatch.setattr(static_cache.CompiledDecode, "step",
                        lambda self, t, k: seen.append(self.ks[0].shape[::2]) or real(self, t, k))
    return seen


def _both(model, monkeypatch, prompts, budget, stops=(), **kw):
    """The same sampling compiled and through the plain loop (no shortcut at all)."""
    fast = sample(model, prompts, budget, list(stops), compiled=True, **kw)
    with monkeypatch.context() as m:
        m.setattr(decode, "next_tokens_compiled", decode.next_tokens)
        m.setattr(decode.DecodeCache, "make_mask", decode.BatchKVCache.make_mask)
        plain = sample(model, prompts, budget, list(stops), compiled=False, **kw)
    return fast, plain


@pytest.mark.parametrize("prompts", [EQUAL, EQUAL[:1], RAGGED, CROSSING, LONG],
                         ids=["equal", "one", "ragged", "crossing", "long"])
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_compiled_step_draws_the_tokens_of_the_plain_loop(model, monkeypatch, steps, prompts, temperature, top_p):
    budget = [9, 4, 12][: len(prompts)]  # rows leave the batch at different steps
    seeds = [5, 6, 7][: len(prompts)]
    fast, plain = _both(model, monkeypatch, prompts, budget, temperature=temperature, top_p=top_p, seeds=seeds)
    assert fast.completions == plain.completions and [len(c) for c in fast.completions] == budget
    assert fast.truncated == plain.truncated == [True] * len(prompts)
    width = max(map(len, prompts)) - 1
    length = -(-(width + max(budget)) // static_cache.STEP) * static_cache.STEP
    assert len(steps) >= max(budget) - 1 and {s[1] for s in steps} == {length}
    assert length == (2 * static_cache.STEP if prompts in (CROSSING, LONG) else static_cache.STEP)
    if len(prompts) == 3:
        # A finished row stays until at most half the rows sample, then the batch shrinks.
        assert [s[0] for s in steps] == [3] * 10 + [1] * 2


def test_rows_stopping_at_different_steps(model, monkeypatch, steps):
    prompts, budget, seeds = RAGGED + [RAGGED[0]], [14] * 4, [1, 2, 3, 4]
    free, _ = _both(model, monkeypatch, prompts, budget, seeds=seeds)
    stops = [free.completions[0][2], free.completions[2][6]]
    ends = [next((i for i, t in enumerate(c) if t in stops), None) for c in free.completions]
    assert len({e for e in ends if e is not None}) >= 2  # rows stop at different steps
    steps.clear()
    fast, plain = _both(model, monkeypatch, prompts, budget, stops, seeds=seeds)
    assert fast.completions == plain.completions and fast.truncated == plain.truncated
    for c, f, e in zip(fast.completions, free.completions, ends):
        assert c == (f if e is None else f[: e + 1])
    assert steps and fast.truncated == [e is None for e in ends]


def test_unkeyed_sampling_and_other_model_types_use_the_plain_loop(model, monkeypatch, steps):
    sample(model, RAGGED, [5, 5, 5], [], compiled=True)  # no seeds: draws read MLX's global random state
    assert steps == []
    monkeypatch.setattr(static_cache, "MODEL_TYPES", set())
    a = sample(model, RAGGED, [5, 5, 5], [], seeds=[1, 2, 3], compiled=True)
    assert steps == [] and [len(c) for c in a.completions] == [5, 5, 5]
    assert not static_cache.supported(model)


def test_new_weights_are_read_without_a_retrace(tiny_model, monkeypatch, steps):
    """The fused LoRA weights change at every rollout: the compiled step reads them as inputs."""
    model, _ = load(str(tiny_model))
    attach_adapters(model, "lora", -1, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    traces, trace = [], static_cache._step
    monkeypatch.setattr(static_cache, "_step", lambda *a: traces.append(1) or trace(*a))
    runs = []
    for seed in (1, 2):
        for m in (m for _, m in model.named_modules() if isinstance(m, LoRALinear)):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(seed)) * 0.05
        runs.append(_both(model, monkeypatch, EQUAL, [8] * 3, seeds=[5, 6, 7]))
    assert all(fast.completions == plain.completions for fast, plain in runs)
    assert runs[0][0].completions != runs[1][0].completions  # the new adapters were used
    assert len(traces) == 1 and len(steps) == 2 * 8  # one batch shape: traced once for both rollouts


def test_static_cache_computes_the_logits_of_the_batch_cache(model):
    """Model logits of each decode step, compiled over the fixed buffer vs mlx-lm's cache."""
    prompts = RAGGED
    cache = decode._prefill(model, prompts, 512)
    compiled = static_cache.CompiledDecode(model, decode._prefill(model, prompts, 512), 16,
                                           lambda logits, keys, t, p: (logits, keys), 0.0, 1.0)
    tokens_B = mx.array([p[-1] for p in prompts])
    for _ in range(16):
        logits_BV = model(tokens_B[:, None], cache=cache)[:, -1, :]
        assert mx.array_equal(compiled.step(tokens_B, None)[0], logits_BV).item()
        tokens_B = mx.argmax(logits_BV, axis=-1)


def test_compiled_decode_off_uses_the_plain_loop(model, steps):
    """--no-compiled-decode: `sample(compiled=False)` takes no compiled step."""
    off = sample(model, RAGGED, [6, 6, 6], [], seeds=[1, 2, 3], compiled=False)
    assert steps == []
    on = sample(model, RAGGED, [6, 6, 6], [], seeds=[1, 2, 3], compiled=True)
    assert steps and on.completions == off.completions


@pytest.mark.parametrize("model_type", sorted(static_cache.MODEL_TYPES))
def test_every_listed_model_type_draws_the_tokens_of_the_plain_loop(model_type, monkeypatch, steps):
    """MODEL_TYPES claims each reads the cache only through offset, update_and_fetch and
    make_mask: a tiny random model of each type samples the same tokens both ways."""
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    args = module.ModelArgs.from_dict({
        "model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "vocab_size": 400, "tie_word_embeddings": True, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "no_rope_layer_interval": 2})  # smollm3: a layer without RoPE
    mx.random.seed(0)
    model = module.Model(args)
    model.eval()
    fast, plain = _both(model, monkeypatch, RAGGED, [9, 4, 12], seeds=[5, 6, 7])
    assert steps and fast.completions == plain.completions
