"""The generation options, each checked once before any work: how a token is drawn (`Sampling`:
temperature, top-k, top-p, OpenAI's penalties), the seed, and how many log-probabilities to
report; `Options` carries them, whole, into the decode loop."""

from typing import NamedTuple, Optional

import numpy as np

from picogpt.generation import sampling

MAX_LOGPROBS = 20


class Sampling(NamedTuple):
    """How one token is drawn from a row of logits (checked by check_sampling)."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    frequency_penalty: float
    presence_penalty: float


class Options(NamedTuple):
    sampling: Sampling
    stop: tuple
    logprobs: Optional[int]
    stop_at_eos: bool


def check_sampling(temperature, top_k, top_p, frequency_penalty=0.0, presence_penalty=0.0):
    """The sampling options, or ValueError naming the one that means nothing."""
    sampling.check_options(temperature, top_k, top_p)
    sampling.check_penalties(frequency_penalty, presence_penalty)
    return Sampling(temperature, top_k, top_p, float(frequency_penalty), float(presence_penalty))


def check_logprobs(logprobs):
    """None, or an integer K in 0..20 (how many alternatives to report)."""
    if logprobs is None:
        return None
    if not sampling.is_integer(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS:
        raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, "
                         f"got {logprobs!r}")
    return int(logprobs)


def check_seed(seed):
    """The base seed: an integer >= 0 as given; None draws one from the OS."""
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    if not sampling.is_integer(seed) or seed < 0:
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
    return int(seed)
