"""The layers of training, each backward against finite differences of its forward (float64)."""

import numpy as np
import pytest
from _gradcheck import assert_close, check_layer, numerical_grad, randn

from picogpt import layers

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


@pytest.mark.parametrize("n_head", [1, 3])
def test_causal_attention_backward(n_head):
    B, T, C = 2, 5, 6
    y, _ = layers.attention_forward(randn(B * T, 3 * C), B, T, n_head)
    assert y.shape == (B * T, C)
    check_layer(lambda qkv: layers.attention_forward(qkv, B, T, n_head),
                lambda d, res, grads: (layers.attention_backward(d, res[1]),),
                [randn(B * T, 3 * C)])  # fmt: skip


def test_attention_is_causal():
    B, T, C, n_head = 1, 6, 4, 2
    qkv = randn(B * T, 3 * C)
    y, _ = layers.attention_forward(qkv.copy(), B, T, n_head)
    later = qkv.copy()
    later[3:] += randn(T - 3, 3 * C)  # change positions 3.. only
    y2, _ = layers.attention_forward(later, B, T, n_head)
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


def test_cross_entropy_backward():
    targets = np.array([2, 0, 4, 4])
    logits = randn(4, 5)
    loss, probs = layers.cross_entropy_forward(logits.copy(), targets)
    expected = -np.mean(np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[
        np.arange(4), targets])  # fmt: skip
    assert loss == pytest.approx(expected, rel=1e-12)
    numeric = numerical_grad(lambda: layers.cross_entropy_forward(logits.copy(), targets)[0],
                             logits)  # fmt: skip
    assert_close(layers.cross_entropy_backward(probs, targets), numeric)
