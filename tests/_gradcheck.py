"""Gradient checking for the training tests: finite differences and a layer checker."""

import numpy as np

RNG = np.random.default_rng(0)


def numerical_grad(f, x, eps=1e-6):
    """d f / d x by central differences, one element at a time (x is perturbed in place)."""
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        up = f()
        flat[i] = old - eps
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return grad


def assert_close(analytic, numeric, tol=1e-6):
    scale = max(np.abs(numeric).max(), 1e-8)
    assert np.abs(analytic - numeric).max() / scale < tol


def randn(*shape):
    return RNG.standard_normal(shape)


def check_layer(forward, backward, inputs, params=(), out_index=None):
    """Check backward against finite differences of L = sum(forward(...) * R), R random.
    `forward(*inputs, *params)` returns the output (or a tuple whose [0] is it) and backward
    `(dout, forward_result, param_grads)` returns the input gradients (a tuple)."""
    inputs, params = list(inputs), list(params)

    def out():
        result = forward(*[a.copy() for a in inputs], *params)
        return result[0] if isinstance(result, tuple) else result

    R = randn(*out().shape)

    def loss():
        return float((out() * R).sum())

    result = forward(*[a.copy() for a in inputs], *params)
    param_grads = [np.zeros_like(p) for p in params]
    input_grads = backward(R, result, param_grads)
    for x, dx in zip(inputs, input_grads):
        assert_close(dx, numerical_grad(loss, x))
    for p, dp in zip(params, param_grads):
        assert_close(dp, numerical_grad(loss, p))
