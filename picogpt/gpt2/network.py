"""GPT-2's forward and backward for training, composed from the layers (gpt2/layers.py): a
transformer block, the whole network with its loss, and the parameters as one flat buffer.

The model is GPT-2 exactly (token and position embeddings, pre-LayerNorm blocks, causal
attention, tanh-GELU MLP, final LayerNorm, output projection tied to the token embedding), so
what trains here runs unchanged in the engine (gpt2/engine.py). All parameters live in one flat
float32 buffer (and their gradients in another), so AdamW and gradient clipping are a few
whole-buffer operations, and the engine's names and shapes are views of it.
"""

import math
from typing import NamedTuple, Optional

import numpy as np

from picogpt.gpt2 import layers
from picogpt.gpt2 import params as table

# --- the model over the layers: a transformer block ----------------------------------------


def block_params(params, i):
    """Block i's parameters by short name, weights as [nx, nf] views of the [1, nx, nf] arrays."""
    p = f"model/h{i}/"
    return {
        "ln_1": (params[p + "ln_1/g"], params[p + "ln_1/b"]),
        "c_attn": (params[p + "attn/c_attn/w"][0], params[p + "attn/c_attn/b"]),
        "c_proj": (params[p + "attn/c_proj/w"][0], params[p + "attn/c_proj/b"]),
        "ln_2": (params[p + "ln_2/g"], params[p + "ln_2/b"]),
        "c_fc": (params[p + "mlp/c_fc/w"][0], params[p + "mlp/c_fc/b"]),
        "mlp_proj": (params[p + "mlp/c_proj/w"][0], params[p + "mlp/c_proj/b"]),
    }


class BlockCache(NamedTuple):
    """What a block's forward keeps for its backward: per row, 14 floats per channel plus the
    attention probabilities. LayerNorms' and GELU's outputs are recomputed from their caches
    (a multiply-add each) rather than kept."""

    ln_1: layers.LayerNormCache
    attn: layers.AttentionCache  # q, k, v: c_attn's output [N, 3C] by head
    a: np.ndarray  # the attention's output, c_proj's input [N, C]
    drop_1: Optional[np.ndarray]  # dropout mask of the attention branch
    ln_2: layers.LayerNormCache
    gelu: layers.GeluCache  # c_fc's output [N, 4C] and its GELU gate
    drop_2: Optional[np.ndarray]  # dropout mask of the MLP branch


def block_forward(x, p, B, T, n_head, dropout=0.0, rng=None):
    """One transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.)). x [B*T, C]."""
    h1, ln_1 = layers.layer_norm_forward(x, *p["ln_1"])
    qkv = layers.linear_forward(h1, *p["c_attn"])  # [N, C] -> [N, 3C]
    del h1
    a, attn = layers.attention_forward(qkv, B, T, n_head, dropout, rng)  # [N, 3C] -> [N, C]
    a_out, drop_1 = layers.dropout_forward(layers.linear_forward(a, *p["c_proj"]), dropout, rng)
    x2 = x + a_out  # residual
    del a_out
    h2, ln_2 = layers.layer_norm_forward(x2, *p["ln_2"])
    f = layers.linear_forward(h2, *p["c_fc"])  # [N, C] -> [N, 4C]
    del h2
    g, gelu = layers.gelu_forward(f)
    m = layers.linear_forward(g, *p["mlp_proj"])  # [N, 4C] -> [N, C]
    del g
    m_out, drop_2 = layers.dropout_forward(m, dropout, rng)
    x2 += m_out  # residual
    return x2, BlockCache(ln_1, attn, a, drop_1, ln_2, gelu, drop_2)


def block_backward(dout, cache, p, grads):
    """A residual's backward hands its output gradient to both of its branches unchanged."""
    c = cache
    dm = layers.dropout_backward(dout, c.drop_2)
    g = layers.gelu_output(c.gelu)
    dg = layers.linear_backward(dm, g, p["mlp_proj"][0], *grads["mlp_proj"])
    del g, dm
    df = layers.gelu_backward(dg, c.gelu)
    del dg
    h2 = layers.layer_norm_output(c.ln_2, *p["ln_2"])
    dh2 = layers.linear_backward(df, h2, p["c_fc"][0], *grads["c_fc"])
    del df, h2
    dx2 = layers.layer_norm_backward(dh2, c.ln_2, p["ln_2"][0], *grads["ln_2"])
    dx2 += dout
    del dh2
    da_out = layers.dropout_backward(dx2, c.drop_1)
    da = layers.linear_backward(da_out, c.a, p["c_proj"][0], *grads["c_proj"])
    del da_out
    dqkv = layers.attention_backward(da, c.attn)
    del da
    h1 = layers.layer_norm_output(c.ln_1, *p["ln_1"])
    dh1 = layers.linear_backward(dqkv, h1, p["c_attn"][0], *grads["c_attn"])
    del dqkv, h1
    dx = layers.layer_norm_backward(dh1, c.ln_1, p["ln_1"][0], *grads["ln_1"])
    dx += dx2
    return dx


# --- the whole network -------------------------------------------------------------------------


class GPTCache(NamedTuple):
    idx: np.ndarray  # [B, T] input ids
    drop: Optional[np.ndarray]  # dropout mask of the embedding
    blocks: list  # a BlockCache per block
    ln_f: layers.LayerNormCache
    dh: Optional[np.ndarray]  # d loss / d ln_f's output [N, C] (with grads), else None


def gpt_forward(params, hparams, idx, targets, dropout=0.0, rng=None, grads=None):
    """Mean cross-entropy of predicting targets [B, T] from idx [B, T]; and what backward needs.

    With `grads`, the output layer's backward runs here too (classifier_forward): it writes the
    output projection's part of grads["model/wte"], and gpt_backward does the rest. Without,
    this is an evaluation and gpt_backward cannot follow."""
    B, T = idx.shape
    wte = params["model/wte"]
    x = layers.embedding_forward(wte, params["model/wpe"], idx)  # [B, T] -> [N, C]
    x, drop = layers.dropout_forward(x, dropout, rng)
    blocks = []
    for i in range(hparams["n_layer"]):
        x, cache = block_forward(x, block_params(params, i), B, T, hparams["n_head"], dropout, rng)
        blocks.append(cache)
    h, ln_f = layers.layer_norm_forward(x, params["model/ln_f/g"], params["model/ln_f/b"])
    del x
    # The output projection is the token embedding: [N, C] -> [N, V] logits, in row blocks.
    dwte = None if grads is None else grads["model/wte"]
    loss, dh = layers.classifier_forward(h, wte, targets.reshape(-1), dwte)
    return loss, GPTCache(idx, drop, blocks, ln_f, dh)


def gpt_backward(cache, params, hparams, grads):
    """Fill `grads` (arrays shaped like params) with d loss / d params; `cache` from a
    gpt_forward given the same `grads`."""
    c = cache
    if c.dh is None:
        raise ValueError("gpt_backward needs a gpt_forward run with grads")
    dx = layers.layer_norm_backward(c.dh, c.ln_f, params["model/ln_f/g"], grads["model/ln_f/g"],
                                    grads["model/ln_f/b"])  # fmt: skip
    for i in reversed(range(hparams["n_layer"])):
        dx = block_backward(dx, c.blocks[i], block_params(params, i), block_params(grads, i))
        c.blocks[i] = None  # its activations are no longer needed
    dx = layers.dropout_backward(dx, c.drop)
    layers.embedding_backward(dx, c.idx, grads["model/wte"], grads["model/wpe"])


# --- parameters -------------------------------------------------------------------------------


def param_shapes(hparams):
    """Every parameter's name and shape, as the engine reads them (gpt2/params.py), with the
    matrices, which weight decay applies to, first."""
    shapes = table.param_shapes(hparams)
    matrices = {name: shape for name, shape in shapes.items() if len(shape) >= 2}
    return {**matrices, **{name: shape for name, shape in shapes.items() if len(shape) < 2}}


def flat_views(shapes, dtype=np.float32):
    """One zeroed buffer holding every array, and each array as a view into it."""
    flat = np.zeros(sum(math.prod(s) for s in shapes.values()), dtype)
    views, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        views[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return flat, views


def n_decayed(shapes):
    """How many leading elements of the flat buffer are matrices (weight-decayed)."""
    return sum(math.prod(s) for s in shapes.values() if len(s) >= 2)


def init_params(params, hparams, rng):
    """GPT-2's initialisation: N(0, 0.02) weights, the residual projections scaled down by
    sqrt(2 n_layer) so the residual stream's variance does not grow with depth; zero biases,
    unit LayerNorm gains."""
    proj_std = 0.02 / math.sqrt(2 * hparams["n_layer"])
    for name, array in params.items():
        if name.endswith("/g"):
            array[...] = 1.0
        elif array.ndim >= 2:
            std = proj_std if name.endswith("c_proj/w") else 0.02
            array[...] = rng.normal(0.0, std, array.shape)
        else:
            array[...] = 0.0
