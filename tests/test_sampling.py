"""Sampling checked statistically on a known distribution (fixed seeds: deterministic tests)."""

import numpy as np
import pytest

from picogpt.generation import sampling

LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])).astype(np.float32)
DRAWS = 20_000


def frequencies(temperature=1.0, top_k=None, top_p=None, seed=0):
    rng = np.random.default_rng(seed)
    batch = np.tile(LOGITS, (DRAWS, 1))
    picks = sampling.sample(batch, rng, temperature, top_k, top_p)
    return np.bincount(picks, minlength=len(LOGITS)) / DRAWS


def assert_matches(freq, expected):
    """Every frequency within 5 standard errors of its expected probability."""
    se = np.sqrt(expected * (1 - expected) / DRAWS) + 1e-12
    assert np.all(np.abs(freq - expected) <= 5 * se + 1e-9), (freq, expected)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_plain_sampling_follows_the_softmax():
    assert_matches(frequencies(), softmax(LOGITS.astype(np.float64)))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_and_flattens(temperature):
    expected = softmax(LOGITS.astype(np.float64) / temperature)
    assert_matches(frequencies(temperature), expected)


def test_greedy_is_argmax():
    logits = np.random.default_rng(1).standard_normal((5, 100)).astype(np.float32)
    assert np.array_equal(sampling.sample(logits, None, temperature=0), logits.argmax(-1))


def test_top_k_keeps_the_k_most_likely_in_proportion():
    expected = np.zeros(len(LOGITS))
    expected[:3] = softmax(LOGITS[:3].astype(np.float64))
    assert_matches(frequencies(top_k=3), expected)


def test_top_p_keeps_the_smallest_nucleus():
    # Cumulative 0.4, 0.65, 0.8, ...: top_p 0.7 needs the first three tokens.
    expected = np.zeros(len(LOGITS))
    expected[:3] = np.array([0.4, 0.25, 0.15]) / 0.8
    assert_matches(frequencies(top_p=0.7), expected)
    only_first = frequencies(top_p=0.3)
    assert only_first[0] == 1.0


def test_same_seed_same_draws_other_seed_other_draws():
    a, b, c = (frequencies(seed=s) for s in (7, 7, 8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    "options", [dict(temperature=-1), dict(top_k=-2), dict(top_p=0), dict(top_p=1.5),
                dict(temperature=float("nan"))],
)  # fmt: skip
def test_bad_options(options):
    args = dict(temperature=1.0, top_k=None, top_p=None) | options
    with pytest.raises(ValueError):
        sampling.check_options(**args)
