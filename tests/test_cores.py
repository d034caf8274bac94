"""The batch in shards over the cores: the threads run at once with BLAS single-threaded, and
put its thread count back; an error in one shard waits for the others; and a sharded training
step is the whole batch's step."""

import threading
import time

import numpy as np
import pytest

from picogpt.gpt2 import cores, network
from picogpt.training.config import DEFAULTS
from picogpt.training.data import get_batch
from picogpt.training.loop import Trainer
from picogpt.training.memory import SHARD_MAX_WIDTH, shards
from picogpt.training.run_folder import RunFolder

needs_threads = pytest.mark.skipif(
    cores.workers() < 2, reason="needs OpenBLAS found and at least 2 cores for it")


def test_split_covers_every_sequence_in_near_equal_shards():
    for n in (1, 2, 3, 7, 12):
        parts = cores.split(n)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        sizes = [stop - start for start, stop in parts]
        assert len(parts) == min(n, cores.workers()) and max(sizes) - min(sizes) <= 1


@needs_threads
def test_shards_run_at_once_on_single_threaded_blas_and_it_is_restored():
    before = cores.blas_threads()
    barrier = threading.Barrier(2, timeout=10)  # passes only if both calls run at the same time
    seen = []

    def shard(i):
        barrier.wait()
        seen.append((i, threading.get_ident(), cores.blas_threads()))
        return i * 10

    assert cores.run(shard, 2) == [0, 10]
    assert {threads for _, _, threads in seen} == {1}
    assert len({ident for _, ident, _ in seen}) == 2
    assert cores.blas_threads() == before > 1


@needs_threads
def test_an_error_in_one_shard_is_raised_after_every_shard_ended():
    ended = []
    before = cores.blas_threads()

    def shard(i):
        if i == 0:
            raise ValueError("shard 0 failed")
        time.sleep(0.2)
        ended.append(i)

    with pytest.raises(ValueError, match="shard 0 failed"):
        cores.run(shard, 2)
    assert ended == [1]
    assert cores.blas_threads() == before


def make_trainer(out, **config):
    hparams = {"n_vocab": 11, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    config = dict(DEFAULTS, block_size=16, batch_size=5, **config)
    trainer = Trainer(config, hparams, None, RunFolder(out, []), {})
    trainer.initialize()
    return trainer


def test_a_sharded_step_is_the_whole_batch_step(tmp_path):
    """Trainer.loss over shards against gpt_forward and gpt_backward over the whole batch, in
    one call: the same loss and gradient, to float32 rounding (5 sequences: unequal shards)."""
    trainer = make_trainer(tmp_path)
    x, y = get_batch(np.arange(200, dtype=np.uint16) % 11, 16, 5, np.random.default_rng(0))
    assert len(shards(trainer.hparams, 5)) == min(5, cores.workers())
    loss = trainer.loss(x, y, backward=True)
    _, grads = network.flat_views(network.param_shapes(trainer.hparams))
    whole, cache = network.gpt_forward(trainer.params, trainer.hparams, x, y, grads=grads)
    network.gpt_backward(cache, trainer.params, trainer.hparams, grads)
    flat = np.concatenate([g.reshape(-1) for g in grads.values()])
    assert loss == pytest.approx(whole, rel=1e-6)
    scale = np.abs(flat).max()
    assert np.abs(trainer.flat_grad - flat).max() <= 1e-6 * scale
    assert trainer.loss(x, y) == pytest.approx(whole, rel=1e-6)  # the evaluation's, sharded too


def test_sharded_steps_with_dropout_are_reproducible(tmp_path):
    """Each shard draws its own dropout from the step's generator: two runs are equal."""
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path / name, dropout=0.2)
        data = np.arange(500, dtype=np.uint16) % 11
        for it in range(3):
            rng = np.random.default_rng([0, it])
            trainer.step(*get_batch(data, 16, 5, rng), 1e-2, rng)
        runs.append(trainer.flat.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def test_wide_models_are_not_sharded():
    wide = {"n_embd": SHARD_MAX_WIDTH * 3 // 2}
    assert shards(wide, 12) == [(0, 12)]


def test_set_workers_bounds_the_shards():
    before = cores.set_workers(1)
    try:
        assert cores.split(12) == [(0, 12)]
        assert cores.run(lambda i: threading.get_ident(), 2) == [threading.get_ident()] * 2
        with pytest.raises(ValueError, match="at least 1"):
            cores.set_workers(0)
    finally:
        cores.set_workers(before)
    assert len(cores.split(12)) == cores.workers()
