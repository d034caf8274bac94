"""No subnormal floats leave the hot paths (Intel cores compute with them dozens of times slower),
and the results still match float64 references, on inputs built to produce them: score rows whose
range is far wider than float32's exp can represent normally."""

import math

import numpy as np
import pytest

from picogpt.generation import sampling
from picogpt.gpt2 import engine, kernels


def subnormals(x):
    x = np.asarray(x)
    return int(np.count_nonzero((x != 0) & (np.abs(x) < np.finfo(x.dtype).tiny)))


def wide_scores(rng, shape, spread=300.0):
    """Scores spread over [-spread, 0] around each row's max: most of their exp is subnormal or
    0 in float32, as in GPT-2's attention rows, where a few keys take nearly all the weight."""
    return (rng.random(shape, dtype=np.float32) * -spread).astype(np.float32)


def reference_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def naive_softmax(x):
    """Softmax without a floor, as the engine computed it before: the inputs must make this one
    produce subnormals, or the tests below prove nothing."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_has_no_subnormals_and_matches_float64():
    rng = np.random.default_rng(0)
    x = wide_scores(rng, (4, 8, 300))
    x[..., 7] = 0.0  # a max in every row, others within a few units of it
    x[..., 8:12] = -rng.random((4, 8, 4), dtype=np.float32) * 3
    x[:, :, 200:] = -np.inf  # masked
    assert subnormals(naive_softmax(x)) > 100
    expected = reference_softmax(x)
    got = kernels.softmax_(x.copy())
    assert got.dtype == np.float32 and subnormals(got) == 0
    assert np.all(got[:, :, 200:] == 0)  # masked: exactly 0
    # Below e^-48 a probability may be 0 (flushed); above, float32's rounding.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=math.exp(-48))
    assert np.all(got[expected > 1e-12] > 0)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-6)


def test_softmax_flushes_only_below_the_floor():
    # Weights just above the floor survive (barely changed), ones below become exactly 0.
    x = np.array([[0.0, -47.0, -47.9, -48.5, -60.0, -200.0]], np.float32)
    got = kernels.softmax_(x.copy())[0]
    expected = reference_softmax(x)[0]
    assert got[0] == np.float32(expected[0])
    assert got[1] > 0 and abs(got[1] - expected[1]) < 1.01 * math.exp(-48)
    assert got[2] >= 0 and subnormals(got) == 0
    assert np.all(got[3:] == 0)


def test_shifted_exp_stays_in_the_normal_range():
    x = wide_scores(np.random.default_rng(1), (6, 500))
    x[:, 0] = 0.0
    x[:, 1] = -np.inf
    got = kernels.shifted_exp_(x.copy())
    assert subnormals(got) == 0
    assert got.min() >= np.float32(math.exp(-48)) * (1 - 1e-6) and got.max() == 1.0
    kept = x >= -48
    np.testing.assert_allclose(got[kept], np.exp(x[kept].astype(np.float64)), rtol=1e-6)


def reference_attention(q, k, v, offset):
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    scores = q @ k.swapaxes(-1, -2)  # [B, H, Tq, Tk]
    Tq, Tk = scores.shape[-2:]
    future = np.arange(Tk)[None, :] > (offset + np.arange(Tq))[:, None]
    scores[..., future] = -np.inf
    return reference_softmax(scores) @ v


@pytest.mark.parametrize("block_bytes", [engine.ATTN_BLOCK_BYTES, 2 * 4 * 37 * 4 * 5])
@pytest.mark.parametrize("offset, tq", [(0, 37), (20, 17), (36, 1)])
def test_attention_with_wide_scores(monkeypatch, block_bytes, offset, tq):
    monkeypatch.setattr(engine, "ATTN_BLOCK_BYTES", block_bytes)  # 5-row blocks in the second
    rng = np.random.default_rng(2)
    B, H, hd = 2, 4, 8
    # Small integers: the scores (std ~50) are exact in float32, so what differs from float64
    # is the softmax's own rounding, not that of the products before it.
    q = rng.integers(-12, 13, (B, H, tq, hd)).astype(np.float32)
    k = rng.integers(-3, 4, (B, H, offset + tq, hd)).astype(np.float32)
    v = rng.standard_normal((B, H, offset + tq, hd), dtype=np.float32)
    assert subnormals(naive_softmax(q @ k.swapaxes(-1, -2))) > 0
    expected = reference_attention(q, k, v, offset)
    weights = []  # what the product with v gets: subnormals there would slow it down
    real_exp = kernels.shifted_exp_
    monkeypatch.setattr(kernels, "shifted_exp_", lambda x: weights.append(real_exp(x)) or x)
    got = engine.attention(q, k, v, offset)
    assert weights and sum(subnormals(w) for w in weights) == 0
    assert got.dtype == np.float32 and subnormals(got) == 0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_attention_masks_the_future_exactly():
    # Huge values at future positions: a weight of e^-48 on them would show as 1e9.
    rng = np.random.default_rng(3)
    q = rng.integers(-12, 13, (1, 2, 16, 8)).astype(np.float32)
    k = rng.integers(-3, 4, (1, 2, 16, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 16, 8), dtype=np.float32)
    got = engine.attention(q, k, v, 0)
    for t in range(16):
        v_future = v.copy()
        v_future[:, :, t + 1 :] = 1e30
        assert np.array_equal(engine.attention(q, k, v_future, 0)[:, :, t], got[:, :, t])


def reference_gelu(x):
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_gelu_has_no_subnormals_and_matches_float64():
    # Large negative inputs drive 1 + tanh(.) towards 0: in float32 it is 0 or at least 2^-24.
    x = np.concatenate([np.linspace(-40, 40, 20001, dtype=np.float32),
                        np.float32([-1e-3, 1e-30, -1e-30, 0.0])])  # fmt: skip
    got = kernels.gelu_(x.copy())
    assert subnormals(got) == 0
    np.testing.assert_allclose(got, reference_gelu(x), rtol=1e-5, atol=2e-6)


def test_sampling_probabilities_have_no_subnormals():
    # A low temperature stretches the logits' range past float64's exp (e^-708 is subnormal).
    rng = np.random.default_rng(4)
    logits = rng.standard_normal(1000) * 20
    keep, p = sampling.candidates(logits, temperature=0.05)
    assert p.dtype == np.float64 and subnormals(p) == 0
    shifted = (logits - logits.max()) / 0.05
    assert subnormals(np.exp(shifted)) > 0  # the naive way has them
    expected = np.exp(shifted - np.log(np.exp(shifted).sum()))
    np.testing.assert_allclose(p, expected[keep], rtol=1e-12, atol=1e-250)
    assert np.all(p[expected[keep] > 1e-200] > 0)


# --- training's layers -----------------------------------------------------------------------


def test_training_attention_has_no_subnormals_and_matches_float64():
    from picogpt.gpt2 import layers

    rng = np.random.default_rng(5)
    B, T, n_head, hd = 2, 24, 2, 4
    C = n_head * hd
    # Integer q and k: q k^T / sqrt(hd) spans hundreds, exactly in float32 (hd = 4: scale 1/2).
    qkv = rng.integers(-10, 11, (B * T, 3 * C)).astype(np.float32)
    qkv[:, 2 * C :] = rng.standard_normal((B * T, C), dtype=np.float32)  # the values
    y, cache = layers.attention_forward(qkv, B, T, n_head, rows=10)  # blocks of 10, 10, 4 rows
    q, k, v = qkv.astype(np.float64).reshape(B, T, 3, n_head, hd).transpose(2, 0, 3, 1, 4)
    assert subnormals(naive_softmax((q @ k.swapaxes(-1, -2)).astype(np.float32) / 2)) > 0
    assert subnormals(y) == 0
    for start, p in zip(range(0, T, 10), cache.probs):  # [B, H, rows, stop]
        assert subnormals(p) == 0
        future = np.arange(p.shape[-1]) > np.arange(start, start + p.shape[2])[:, None]
        assert np.all(p[..., future] == 0) and np.all(p[..., ~future] > 0)
    expected = reference_attention(q / 2, k, v, 0).transpose(0, 2, 1, 3).reshape(B * T, C)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    dqkv = layers.attention_backward(rng.standard_normal((B * T, C), dtype=np.float32), cache)
    assert dqkv.dtype == np.float32 and subnormals(dqkv) == 0


def test_training_gelu_has_no_subnormals_and_matches_float64():
    from picogpt.gpt2 import layers

    x = np.linspace(-40, 40, 20001, dtype=np.float32).reshape(1, -1)
    out, cache = layers.gelu_forward(x)
    assert subnormals(out) == 0 and subnormals(cache.gate) == 0
    np.testing.assert_allclose(out, reference_gelu(x), rtol=1e-5, atol=2e-6)
    dx = layers.gelu_backward(np.ones_like(x), cache)
    assert subnormals(dx) == 0
    x64 = x.astype(np.float64)
    u = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)
    expected = 0.5 * (1 + np.tanh(u)) + 0.5 * x64 * (1 - np.tanh(u) ** 2) * math.sqrt(
        2 / math.pi) * (1 + 3 * 0.044715 * x64**2)  # fmt: skip
    np.testing.assert_allclose(dx, expected, rtol=1e-4, atol=1e-5)
