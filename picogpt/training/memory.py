"""The memory plan of a training run: how a batch is split into shards over the cores, and the
bytes a step needs at its peak (checked against the machine's before a run starts)."""

from picogpt.gpt2 import cores, layers

# Models up to this wide have each batch split over the cores (gpt2/cores.py). Wider, the matrix
# products are most of a step, BLAS's own threads already keep every core busy, and a shard
# gains nothing while its gradient buffer costs 4 bytes a parameter (benchmarks/README.md has
# the measured steps at each width).
SHARD_MAX_WIDTH = 512


def shards(hparams, n):
    """[(start, stop)] of the shards n sequences are split into (Trainer.loss)."""
    return cores.split(n) if hparams["n_embd"] <= SHARD_MAX_WIDTH else [(0, n)]


def estimate_memory(hparams, config):
    """Bytes a training step needs at its peak, about: the parameters, their gradient and AdamW's
    two moments (and a gradient sum with --grad-accum, and a gradient per shard after the first:
    Trainer.loss), plus what one micro-batch's forward keeps for its backward (see BlockCache)
    and the largest temporaries of the backward, in each of its shards at once."""
    C, L, H = hparams["n_embd"], hparams["n_layer"], hparams["n_head"]
    B, T = config["batch_size"], config["block_size"]
    n_params = (hparams["n_vocab"] + hparams["n_ctx"]) * C + L * (12 * C * C + 13 * C) + 2 * C
    n_shards = len(shards(hparams, B))
    buffers = 4 + (config["grad_accum"] > 1) + (n_shards - 1)
    N = B * T
    dropout = config["dropout"] > 0
    # Attention keeps its row blocks' probabilities: each block's rows against the keys up to
    # its last row, about half of [T, T].
    R = min(T, layers.ATTN_ROWS)
    scores = B * H * sum((min(T, s + R) - s) * min(T, s + R) for s in range(0, T, R))
    per_block = 4 * (N * C * (14 + 2 * dropout) + scores * (1 + 2 * dropout))
    backward = 4 * (3 * N * 4 * C + 3 * B * H * R * T)  # the MLP's and attention's temporaries
    rows = min(N, n_shards * layers.LOSS_ROWS)  # of logits, over the shards
    head = 4 * (rows * hparams["n_vocab"] + n_shards * layers.VOCAB_ROWS * C + 3 * N * C)
    return 4 * n_params * buffers + L * per_block + backward + head + (200 << 20)  # + Python, NumPy
