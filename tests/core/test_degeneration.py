"""The degeneration definition on hand-built token sequences, and the guards' math."""

import pytest

from mlx_sdft.core import degeneration as dg

STOP = 99


def test_ngram_repeats_counts_overlapping_runs():
    assert dg.max_ngram_repeats([1, 2, 3], n=4) == 0  # shorter than one 4-gram
    assert dg.max_ngram_repeats([1, 2, 3, 4], n=4) == 1
    assert dg.max_ngram_repeats([7] * 6, n=4) == 3  # (7,7,7,7) at 0, 1, 2
    assert dg.max_ngram_repeats([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], n=4) == 3
    assert dg.max_ngram_repeats([1, 2, 3, 4, 5, 1, 2, 3, 4, 6], n=4) == 2


@pytest.mark.parametrize(
    "ids, truncated, want",
    [
        ([5, 6, 7, 8, 9, 10, STOP], False, False),  # a short fluent answer that stopped
        ([5, 6, 7, 8, 9, 10], True, True),  # no stop token: hit its budget
        ([1, 2, 3, 4, 5] * 2 + [STOP], False, False),  # one repeat of a 5-token phrase: fine
        ([1, 2, 3, 4, 5] * 3 + [STOP], False, True),  # "The answer is:\n\n" three times
        (
            [1, 2, 3, 4, 5] * 2 + [1, 2, 3, STOP],
            False,
            False,
        ),  # the third copy is cut short of 4 tokens
        ([1, 2, 3, 4, 5] * 2 + [1, 2, 3, 4, STOP], False, True),
        ([7] * 5 + [STOP], False, False),  # 2 overlapping (7,7,7,7)
        ([7] * 6 + [STOP], False, True),  # 3 overlapping
        ([7] * 5 + [STOP, STOP], False, False),  # only a final stop token is dropped
        ([], False, False),
    ],
)
def test_is_degenerate(ids, truncated, want):
    assert dg.is_degenerate(ids, truncated, [STOP]) is want


def test_stop_token_is_not_part_of_an_ngram():
    ids = [1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert dg.max_ngram_repeats(ids, n=3) == 3
    assert not dg.is_repetitive(
        ids[:-1] + [STOP], [STOP], n=3
    )  # the third (1,2,3) needs its 3, not the stop


def test_rates():
    completions = [[1, 2, STOP], [7] * 8, [4, 5, 6], [1, 2, 3, 4, STOP]]
    truncated = [False, False, True, False]
    assert dg.degenerate_rate(completions, truncated, [STOP]) == pytest.approx(
        0.5
    )  # the loop and the truncated one
    assert dg.degenerate_rate([], [], [STOP]) == 0.0
    demos = [[1, 2, 3, STOP], [1, 2, STOP], [4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert dg.len_ratio(completions, demos) == pytest.approx((3 / 4 + 8 / 3 + 3 / 6 + 5 / 5) / 4)
    with pytest.raises(ValueError):
        dg.len_ratio(completions, demos[:2])
