"""The layers of training, each backward against finite differences of its forward (float64)."""

import numpy as np
import pytest
from _gradcheck import assert_close, check_layer, numerical_grad, randn

from picogpt.gpt2 import layers

# --- each layer ---------------------------------------------------------------------------------


def test_linear_backward():
    x, w = randn(6, 4), randn(4, 5)
    check_layer(layers.linear_forward,
                lambda d, out, grads: (layers.linear_backward(d, x, w, *grads),),
                [x], [w, randn(5)])  # fmt: skip


def test_layer_norm_backward():
    x, g = randn(5, 8) * 3 + 1, randn(8)
    check_layer(layers.layer_norm_forward,
                lambda d, res, grads: (layers.layer_norm_backward(d, res[1], g, *grads),),
                [x], [g, randn(8)])  # fmt: skip


def test_softmax_backward():
    check_layer(layers.softmax_forward,
                lambda d, y, grads: (layers.softmax_backward(d, y),), [randn(3, 4, 7)])  # fmt: skip


@pytest.mark.parametrize("n_head, rows, dropout", [(1, 128, 0), (3, 128, 0), (3, 2, 0), (2, 3, 0),
                                                   (2, 2, 0.3)])  # fmt: skip
def test_causal_attention_backward(n_head, rows, dropout):
    """rows 2 and 3 split T = 5 into blocks, the last one short; a fresh generator of the same
    seed gives each forward the same dropout masks."""
    B, T, C = 2, 5, 6
    y, _ = layers.attention_forward(randn(B * T, 3 * C), B, T, n_head, rows=rows)
    assert y.shape == (B * T, C)
    check_layer(lambda qkv: layers.attention_forward(qkv, B, T, n_head, dropout,
                                                     np.random.default_rng(7), rows=rows),
                lambda d, res, grads: (layers.attention_backward(d, res[1]),),
                [randn(B * T, 3 * C)])  # fmt: skip


def test_attention_blocks_equal_one_block():
    """Row blocks are a schedule, not a different function: the same output and gradient as one
    block over all of [T, T], and the blocks' probabilities tile its lower triangle."""
    B, T, C, n_head = 2, 11, 8, 2
    qkv, dy = randn(B * T, 3 * C).astype(np.float32), randn(B * T, C).astype(np.float32)
    y1, c1 = layers.attention_forward(qkv, B, T, n_head, rows=T)
    y4, c4 = layers.attention_forward(qkv, B, T, n_head, rows=4)
    np.testing.assert_allclose(y4, y1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layers.attention_backward(dy, c4), layers.attention_backward(dy, c1),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert [p.shape for p in c4.probs] == [(B, n_head, 4, 4), (B, n_head, 4, 8), (B, n_head, 3, 11)]
    whole = np.concatenate([np.pad(p, [(0, 0)] * 3 + [(0, T - p.shape[-1])]) for p in c4.probs], 2)
    np.testing.assert_allclose(whole, c1.probs[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_attention_probabilities_are_the_float64_softmax(spread):
    """A block whose scores span less than the exp's floor (spread 1) is shifted by each row's
    own score, a wider one (spread 40) by each row's max: both are the causal softmax, in float32
    rounding."""
    B, T, C, n_head = 2, 9, 8, 2
    qkv = randn(B * T, 3 * C).astype(np.float32)
    qkv[:, :C] *= spread
    y, cache = layers.attention_forward(qkv, B, T, n_head, rows=4)
    q, k, v = qkv.astype(np.float64).reshape(B, T, 3, n_head, -1).transpose(2, 0, 3, 1, 4)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(C // n_head)  # [B, H, T, T]
    for start in range(0, T, 4):  # each block's span (the future's scores too) picks its way
        block = scores[:, :, start : start + 4, : start + 4]
        span = block.max() - block.min()
        assert span < 48 if spread == 1 else span > 48  # model.SOFTMAX_FLOOR
    scores[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for start, block in zip(range(0, T, 4), cache.probs):
        expected = p[:, :, start : start + block.shape[2], : block.shape[3]]
        np.testing.assert_allclose(block, expected, rtol=2e-5, atol=1e-7)
    expected_y = (p @ v).transpose(0, 2, 1, 3).reshape(B * T, C)
    np.testing.assert_allclose(y, expected_y, rtol=1e-4, atol=1e-5)


def test_attention_is_causal():
    B, T, C, n_head = 1, 6, 4, 2
    qkv = randn(B * T, 3 * C)
    y, _ = layers.attention_forward(qkv.copy(), B, T, n_head, rows=4)
    later = qkv.copy()
    later[3:] += randn(T - 3, 3 * C)  # change positions 3.. only
    y2, _ = layers.attention_forward(later, B, T, n_head, rows=4)
    np.testing.assert_array_equal(y[:3], y2[:3])
    assert not np.allclose(y[3:], y2[3:])


def test_gelu_backward():
    x = randn(4, 9) * 2
    check_layer(layers.gelu_forward, lambda d, res, grads: (layers.gelu_backward(d, res[1]),), [x])


def test_dropout_backward_with_its_mask():
    x = randn(50, 40)
    out, mask = layers.dropout_forward(x, 0.25, np.random.default_rng(1))
    dropped = out == 0
    assert 0.2 < dropped.mean() < 0.3
    np.testing.assert_allclose(out[~dropped], x[~dropped] / 0.75)
    dout = randn(50, 40)
    np.testing.assert_allclose(layers.dropout_backward(dout, mask),
                               np.where(dropped, 0, dout / 0.75), rtol=1e-6)  # fmt: skip
    assert layers.dropout_forward(x, 0.0, None)[0] is x


def test_dropout_keeps_the_expectation():
    x = np.ones((1000, 1000), np.float32)
    out, _ = layers.dropout_forward(x, 0.1, np.random.default_rng(2))
    assert out.dtype == np.float32
    assert abs((out == 0).mean() - 0.1) < 0.002
    assert abs(out.mean() - 1.0) < 0.003  # 1/(1-p) makes up for what was dropped


def test_embedding_backward():
    idx = np.array([[1, 3, 1], [0, 1, 2]])
    wte, wpe = randn(4, 5), randn(6, 5)

    def backward(d, out, grads):
        grads[0][...] = 0  # embedding_backward adds into dwte
        layers.embedding_backward(d, idx, *grads)
        return ()

    check_layer(lambda *p: layers.embedding_forward(*p, idx), backward, [], [wte, wpe])


@pytest.mark.parametrize("rows", [3, 8, 256])  # blocks of rows: several, one exactly, one larger
def test_classifier_loss_and_backward_in_row_blocks(rows):
    """The output projection and cross-entropy, forward and backward in one pass over blocks of
    rows: the loss as written out in float64, d h and d wte against finite differences."""
    N, C, V = 8, 4, 11
    h, wte = randn(N, C), randn(V, C)
    targets = np.array([2, 0, 10, 4, 4, 7, 1, 3])

    def loss():
        return layers.classifier_forward(h, wte, targets, rows=rows)[0]

    logits = h @ wte.T
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert loss() == pytest.approx(-np.mean(log_probs[np.arange(N), targets]), rel=1e-12)
    dwte = np.full_like(wte, np.nan)  # set, not added to
    value, dh = layers.classifier_forward(h, wte, targets, dwte, rows=rows)
    assert value == loss()
    assert_close(dh, numerical_grad(loss, h))
    assert_close(dwte, numerical_grad(loss, wte))


def test_classifier_keeps_its_softmax_free_of_subnormals():
    """Logits 100 below their row's maximum would give exp() results below float32's normal
    range (slow on Intel CPUs); they are raised to exp(-60) first, and the loss and gradient
    still match float64's."""
    rng = np.random.default_rng(9)
    N, C, V = 16, 8, 5000
    h = rng.normal(0, 1, (N, C)).astype(np.float32)
    h[:, 0] = 1.0
    wte = rng.normal(0, 8, (V, C)).astype(np.float32)  # logits spread over hundreds
    wte[:2, 1:] = 0
    wte[:2, 0] = 150, 150 - 95  # token 0 is every row's likeliest, token 1 is 95 below it:
    targets = rng.integers(2, V, N)  # exp(-95) is a float32 subnormal
    shifted = h @ wte.T
    shifted -= shifted.max(1, keepdims=True)
    assert (shifted < -88).mean() > 0.3 and (shifted[:, 1] < -88).all()
    dwte = np.empty_like(wte)
    loss, dh = layers.classifier_forward(h, wte, targets, dwte)
    logits = h.astype(np.float64) @ wte.astype(np.float64).T  # the exact softmax, in float64
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    loss64 = -np.mean(np.log(probs[np.arange(N), targets]))
    dlogits = probs.copy()
    dlogits[np.arange(N), targets] -= 1
    dlogits /= N
    dh64, dwte64 = dlogits @ wte.astype(np.float64), dlogits.T @ h.astype(np.float64)
    assert loss == pytest.approx(loss64, rel=1e-5)
    assert np.abs(dh - dh64).max() <= 1e-4 * np.abs(dh64).max()
    assert np.abs(dwte - dwte64).max() <= 1e-4 * np.abs(dwte64).max()
    tiny = np.finfo(np.float32).tiny
    for array in (dh, dwte):
        assert not ((array != 0) & (np.abs(array) < tiny)).any()
