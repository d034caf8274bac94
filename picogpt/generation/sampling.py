"""Turning logits into the next token: greedy, temperature, top-k and top-p (nucleus) sampling."""

import numpy as np

FLUSH_BELOW = -690.0


def check_options(temperature, top_k, top_p):
    """Raise ValueError for options that mean nothing, before any work is done. NumPy's numbers
    are numbers too; a bool is not."""
    if not (is_number(temperature) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and not (is_integer(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if top_p is not None and not (is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def is_integer(value):
    """An int or a NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value):
    """An integer (is_integer), a float or a NumPy float."""
    return is_integer(value) or isinstance(value, (float, np.floating))


def candidates(logits, temperature=1.0, top_k=None, top_p=None):
    """The tokens sampling may pick for one row of logits, and their probabilities (float64)."""
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[-1]
    keep = np.arange(n)
    if top_k and top_k < n:
        keep = np.argpartition(-logits, top_k - 1)[:top_k]
    kept = logits[keep]
    # Shift before dividing: a tiny temperature then sends the others to -inf (probability 0)
    # instead of every logit to inf (NaN probabilities). Below e^-700 exp's results are subnormal
    # (slow on Intel cores), and so would e^-690 / n be: those weights are flushed to exactly 0,
    # probabilities under 1e-299 that no draw can tell from 0.
    with np.errstate(over="ignore"):  # overflowing to -inf is the point (probability 0)
        shifted = (kept - kept.max()) / temperature
    p = np.exp(np.where(shifted < FLUSH_BELOW, -np.inf, shifted))
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, kind="stable")
        cumulative = np.cumsum(p[order])
        # The smallest set of most likely tokens whose mass reaches top_p.
        n_keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
        chosen = order[:n_keep]
        keep, p = keep[chosen], p[chosen] / p[chosen].sum()
    return keep, p


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """The whole distribution sampling draws from, for one row of logits: float64 [n_vocab]."""
    keep, p = candidates(logits, temperature, top_k, top_p)
    out = np.zeros(np.shape(logits)[-1])
    out[keep] = p
    return out


def sample(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Next ids for logits [B, n_vocab]: argmax when temperature is 0, else a draw per row."""
    logits = np.atleast_2d(logits)
    if temperature == 0:
        return logits.argmax(axis=-1)
    picks = []
    for row in logits:
        keep, p = candidates(row, temperature, top_k, top_p)
        picks.append(keep[rng.choice(len(p), p=p)])
    return np.array(picks)


# --- penalties and log-probabilities (OpenAI's semantics) ---------------------------------------

PENALTY_RANGE = (-2.0, 2.0)


def check_penalties(frequency_penalty, presence_penalty):
    """Raise ValueError, naming the option, unless each penalty is a finite number in [-2, 2]."""
    low, high = PENALTY_RANGE
    for name, value in (("frequency_penalty", frequency_penalty),
                        ("presence_penalty", presence_penalty)):
        if not (is_number(value) and np.isfinite(value)):
            raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}], "
                             f"got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def penalize(logits, counts, frequency_penalty=0.0, presence_penalty=0.0):
    """OpenAI's penalties for one row, in float64: logits[j] - c[j] * frequency_penalty
    - (c[j] > 0) * presence_penalty, where counts c[j] says how often token j was generated so
    far. Applied to the raw logits, before temperature, top-k and top-p."""
    out = np.asarray(logits, dtype=np.float64) - counts * float(frequency_penalty)
    out -= (counts > 0) * float(presence_penalty)
    return out


def log_softmax(logits):
    """The model's log-probabilities for one row of raw logits, float64 [n_vocab]:
    logits - log(sum(exp(logits))), computed after subtracting the peak."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def top_ids(logprobs, k):
    """The k likeliest ids of one row, likeliest first (ties: the smaller id first)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, len(logprobs))
    best = np.argpartition(-logprobs, k - 1)[:k]
    return best[np.lexsort((best, -logprobs[best]))]
