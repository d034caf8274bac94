"""The memory plan of a training run: the bytes a step needs at its peak (checked against the
machine's before a run starts)."""

from picogpt.gpt2 import layers, parallel


def estimate_memory(hparams, config):
    """Bytes a training step needs at its peak, about: the parameters, their gradient and AdamW's
    two moments (and a gradient sum with --grad-accum), plus what one micro-batch's forward keeps
    for its backward (see BlockCache) and the largest temporaries of the backward."""
    C, L, H = hparams["n_embd"], hparams["n_layer"], hparams["n_head"]
    B, T = config["batch_size"], config["block_size"]
    n_params = (hparams["n_vocab"] + hparams["n_ctx"]) * C + L * (12 * C * C + 13 * C) + 2 * C
    buffers = 4 + (config["grad_accum"] > 1)
    N = B * T
    dropout = config["dropout"] > 0
    # Attention keeps its row blocks' probabilities: each block's rows against the keys up to
    # its last row, about half of [T, T].
    R = min(T, layers.ATTN_ROWS)
    scores = B * H * sum((min(T, s + R) - s) * min(T, s + R) for s in range(0, T, R))
    per_block = 4 * (N * C * (14 + 2 * dropout) + scores * (1 + 2 * dropout))
    backward = 4 * (3 * N * 4 * C + 3 * B * H * R * T)  # the MLP's and attention's temporaries
    rows = min(N, layers.LOSS_ROWS)  # of logits
    head = 4 * (rows * hparams["n_vocab"] + parallel.threads() * layers.VOCAB_ROWS * C + 3 * N * C)
    return 4 * n_params * buffers + L * per_block + backward + head + (200 << 20)  # + Python, NumPy
