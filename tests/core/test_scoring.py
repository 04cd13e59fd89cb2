"""completion_logits must equal slicing a plain full forward pass, row by row."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_sdft.core import scoring
from mlx_sdft.core.scoring import completion_logits, completion_mask

PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 300, 201], [4, 8, 15, 16, 23, 42, 99, 101, 7]]
COMPLETIONS = [[11, 12, 2], [40, 41, 42, 43, 44, 45, 2], [7]]


def _expected(model, prompt, completion):
    # Unbatched, unpadded: the logit at absolute position t predicts token t+1.
    full = model(mx.array([prompt + completion]))[0]
    P = len(prompt)
    return np.array(full[P - 1 : P - 1 + len(completion)])


@pytest.mark.parametrize("split_head", [True, False])
def test_equals_slicing_full_forward(tiny, monkeypatch, split_head):
    model, _ = tiny
    if not split_head:  # the generic path for architectures without a known head
        monkeypatch.setattr(scoring, "_HEAD_SPLIT", set())
    logits_BTV = np.array(completion_logits(model, PROMPTS, COMPLETIONS))
    assert logits_BTV.shape == (3, 7, model.args.vocab_size)
    for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
        np.testing.assert_allclose(
            logits_BTV[i, : len(c)], _expected(model, p, c), atol=2e-5, rtol=1e-5
        )


def test_alignment_is_not_off_by_one(tiny):
    # Scoring the same completion after a different prompt end must change the first logit row.
    model, _ = tiny
    a = completion_logits(model, [[1, 5, 9]], [[11, 12]])
    b = completion_logits(model, [[1, 5, 10]], [[11, 12]])
    assert not np.allclose(np.array(a[0, 0]), np.array(b[0, 0]))


def test_completion_mask():
    np.testing.assert_array_equal(
        np.array(completion_mask([3, 1, 2])), [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    )
