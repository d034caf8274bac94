"""The memory plan of a training run: how a batch is split into shards of sequences over the
cores, and the bytes a step needs at its peak (checked against the machine's before a run
starts)."""

from picogpt.gpt2 import layers, parallel

# A small model's step is many short passes, and splitting each over the cores costs more to hand
# out than a thread saves (the char recipe: 64 against 54 ms a step on 2 cores). Its batch is
# split instead, into shards of whole sequences, each shard's forward and backward on one
# thread: a few hand-outs a step. Up to this width; wider, the passes are long enough to split,
# and a shard would cost a gradient buffer of 4 bytes a parameter (500 MB for GPT-2 124M).
SHARD_MAX_WIDTH = 512
# At most this many shards: on a 16-core host 12 shards ran the char recipe at 87.8 ms a step
# against 38.7 with 4 (issue 21), their threads' many short passes contending for Python's lock.
MAX_SHARDS = 4


def shards(hparams, n):
    """[(start, stop)] of the shards n sequences are split into: one per thread, up to
    MAX_SHARDS, for a model up to SHARD_MAX_WIDTH wide; else one (its passes are split)."""
    if hparams["n_embd"] > SHARD_MAX_WIDTH:
        return [(0, n)]
    return parallel.ranges(n, min(parallel.threads(), MAX_SHARDS))


def estimate_memory(hparams, config):
    """Bytes a training step needs at its peak, about: the parameters, their gradient and AdamW's
    two moments (and a gradient sum with --grad-accum, and a gradient per shard after the first),
    plus what one micro-batch's forward keeps for its backward (see BlockCache) and the largest
    temporaries of the backward."""
    C, L, H = hparams["n_embd"], hparams["n_layer"], hparams["n_head"]
    B, T = config["batch_size"], config["block_size"]
    n_params = (hparams["n_vocab"] + hparams["n_ctx"]) * C + L * (12 * C * C + 13 * C) + 2 * C
    buffers = 4 + (config["grad_accum"] > 1) + len(shards(hparams, B)) - 1
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
