"""Turning logits into the next token: greedy, temperature, top-k and top-p (nucleus) sampling."""

import numpy as np

FLUSH_BELOW = -690.0


def check_options(temperature, top_k, top_p):
    """Raise ValueError for options that mean nothing, before any work is done."""
    number = isinstance(temperature, (int, float)) and np.isfinite(temperature)
    if not (number and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


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
