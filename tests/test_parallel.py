"""Every core on one pass: the pool splits a pass into ranges that run at once, with BLAS
single-threaded meanwhile and put back after; an error in one range waits for the others; the
thread count is a setting; and the engine's logits and training's losses depend on it only
within float32 rounding (identical from run to run at one count)."""

import contextvars
import threading
import time
import weakref

import numpy as np
import pytest

import picogpt
from picogpt.gpt2 import engine, kernels, network, parallel
from picogpt.gpt2.params import param_shapes
from picogpt.training import memory
from picogpt.training.config import DEFAULTS
from picogpt.training.data import get_batch
from picogpt.training.loop import Trainer
from picogpt.training.optimizer import accumulate, clip_grad_norm, scale_
from picogpt.training.run_folder import RunFolder


def test_ranges_cover_every_item_in_near_equal_parts():
    for n in (1, 2, 3, 7, 12, 100):
        for parts in (1, 2, 5, 16):
            got = parallel.ranges(n, parts)
            assert got[0][0] == 0 and got[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
            sizes = [stop - start for start, stop in got]
            assert len(got) == min(n, parts) and max(sizes) - min(sizes) <= 1
    assert parallel.ranges(100, 16, grain=30) == [(0, 33), (33, 66), (66, 100)]


def test_a_pass_runs_whole_outside_passes(threads):
    threads(4)
    assert parallel.run(lambda a, b: (a, b, threading.get_ident()), 10) == [
        (0, 10, threading.get_ident())]


def test_ranges_run_at_once_on_single_threaded_blas_and_it_is_restored(threads):
    threads(2)
    barrier = threading.Barrier(2, timeout=10)  # passes only if both ranges run at the same time
    seen = []

    def part(start, stop):
        barrier.wait()
        seen.append((threading.get_ident(), parallel.blas_threads()))
        return start * 10

    with parallel.passes():
        assert parallel.run(part, 2) == [0, 10]
    assert len({ident for ident, _ in seen}) == 2
    if parallel.blas_threads() is not None:  # OpenBLAS found: held to 1, then put back
        assert {blas for _, blas in seen} == {1}
        assert parallel.blas_threads() == min(2, parallel.usable_cores())


def test_blas_never_runs_more_threads_than_the_usable_cores(threads):
    if parallel.blas_threads() is None:
        pytest.skip("OpenBLAS not found: BLAS keeps its own threads")
    cores = parallel.usable_cores()
    threads(cores + 3)  # the pool splits over them all, BLAS's spinning workers would take turns
    assert parallel.threads() == cores + 3
    assert parallel.blas_threads() == cores
    with parallel.passes():
        assert parallel.blas_threads() == 1
    assert parallel.blas_threads() == cores
    threads(1)
    assert parallel.blas_threads() == 1


def test_more_threads_than_items_runs_each_item_once(threads):
    threads(8)
    done = []
    with parallel.passes():
        parallel.run(lambda a, b: done.extend(range(a, b)), 3)
    assert sorted(done) == [0, 1, 2]


def test_an_error_in_one_range_is_raised_after_every_range_ended(threads):
    threads(3)
    ended = []

    def part(start, stop):
        if start == 0:
            raise ValueError("range 0 failed")
        time.sleep(0.2)
        ended.append(start)

    with parallel.passes(), pytest.raises(ValueError, match="range 0 failed"):
        parallel.run(part, 3)
    assert sorted(ended) == [1, 2]
    with parallel.passes():  # the pool is still whole
        assert parallel.run(lambda a, b: b - a, 3) == [1, 1, 1]


def test_each_range_runs_in_the_callers_context(threads):
    threads(2)
    setting = contextvars.ContextVar("setting", default="unset")
    barrier = threading.Barrier(2, timeout=10)  # both ranges at once: one on a pool thread

    def part(start, stop):
        barrier.wait()
        return setting.get(), np.geterr()["divide"]

    def caller():
        setting.set("the caller's")
        with np.errstate(divide="ignore"), parallel.passes():
            return parallel.run(part, 2)

    assert contextvars.copy_context().run(caller) == [("the caller's", "ignore")] * 2
    with parallel.passes():  # and nothing of it stays on the pool's threads
        assert parallel.run(lambda a, b: setting.get(), 2) == ["unset", "unset"]


def test_nothing_of_a_pass_outlives_it_on_the_pool(threads):
    """A pass's closure and results may hold arrays of a mapped file: kept by the pool's waiting
    threads, they would keep the file mapped (and its mount busy) until the next pass."""
    threads(3)

    def views_of(array):
        return lambda start, stop: array[start:stop]

    array = np.zeros(12)
    alive = weakref.ref(array)
    with parallel.passes():
        parts = parallel.run(views_of(array), 3)
    assert len(parts) == 3
    del array, parts
    assert alive() is None


def test_a_pass_inside_a_pass_runs_in_its_own_thread(threads):
    threads(2)
    with parallel.passes():
        inner = parallel.run(lambda a, b: parallel.run(lambda c, d: threading.get_ident(), 4), 2)
    assert all(len(set(idents)) == 1 for idents in inner)


def test_the_thread_count_is_a_setting(threads, monkeypatch):
    monkeypatch.setenv(parallel.ENV, "3")
    threads(None)
    assert parallel.threads() == 3
    threads(5)
    assert parallel.threads() == 5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="at least 1"):
            parallel.set_threads(bad)
    threads(None)
    monkeypatch.setenv(parallel.ENV, "many")
    with pytest.raises(ValueError, match="PICOGPT_THREADS"):
        parallel.threads()
    with pytest.raises(ValueError, match="PICOGPT_THREADS"):  # at load, not at a forward
        picogpt.load("shakespeare-char")
    monkeypatch.delenv(parallel.ENV)
    assert parallel.threads() == parallel.usable_cores()


def random_params(hparams, seed=0):
    rng = np.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(np.float32) * np.float32(0.3)
              for name, shape in param_shapes(hparams).items()}  # fmt: skip
    for name in params:
        if name.endswith("/g"):
            params[name][:] = 1.0
    return params


def test_logits_depend_on_the_thread_count_only_within_rounding(threads):
    """A prefill (split) and decoding steps (whole) at 1, 2, 3 and 5 threads: the logits agree
    within 1e-5 of their largest, and two runs at one count are identical."""
    hparams = {"n_vocab": 300, "n_ctx": 64, "n_embd": 96, "n_head": 6, "n_layer": 2}
    gpt = engine.GPT(random_params(hparams), hparams)
    ids = np.random.default_rng(1).integers(0, 300, (2, 40))

    def logits():
        cache = gpt.new_cache(2)
        prefill = gpt.forward(ids[:, :36], cache, all_logits=True)
        steps = [gpt.forward(ids[:, t : t + 1], cache) for t in range(36, 40)]
        return np.concatenate([prefill.reshape(-1), *[s.reshape(-1) for s in steps]])

    results = {}
    for n in (1, 2, 3, 5):
        threads(n)
        results[n] = logits()
        np.testing.assert_array_equal(results[n], logits())
    scale = np.abs(results[1]).max()
    for n in (2, 3, 5):
        assert np.abs(results[n] - results[1]).max() <= 1e-5 * scale


def make_trainer(out, hparams=None, **config):
    hparams = hparams or {"n_vocab": 11, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    config = {**DEFAULTS, "block_size": hparams["n_ctx"], "batch_size": 5, **config}
    trainer = Trainer(config, hparams, None, RunFolder(out, []), {})
    trainer.initialize()
    return trainer


@pytest.mark.parametrize("how", ["shards", "passes"])
def test_a_split_step_is_the_whole_step(tmp_path, threads, how, monkeypatch):
    """Trainer.loss over 3 threads, its 5 sequences in shards (unequal ones) or each pass split
    (a model wider than memory.SHARD_MAX_WIDTH), against gpt_forward and gpt_backward run whole,
    in one call: the same loss and gradient, to float32 rounding."""
    threads(3)
    if how == "passes":
        monkeypatch.setattr(memory, "SHARD_MAX_WIDTH", 8)
    trainer = make_trainer(tmp_path)
    x, y = get_batch(np.arange(200, dtype=np.uint16) % 11, 16, 5, np.random.default_rng(0))
    assert len(memory.shards(trainer.hparams, 5)) == (3 if how == "shards" else 1)
    loss = trainer.loss(x, y, backward=True)
    _, grads = network.flat_views(network.param_shapes(trainer.hparams))
    whole, cache = network.gpt_forward(trainer.params, trainer.hparams, x, y, grads=grads)
    network.gpt_backward(cache, trainer.params, trainer.hparams, grads)
    flat = np.concatenate([g.reshape(-1) for g in grads.values()])
    assert loss == pytest.approx(whole, rel=1e-6)
    scale = np.abs(flat).max()
    assert np.abs(trainer.flat_grad - flat).max() <= 1e-6 * scale
    assert trainer.loss(x, y) == pytest.approx(whole, rel=1e-6)  # the evaluation's, split too


def test_passes_over_a_flat_buffer_split_over_threads_reach_every_part(threads):
    """clip_grad_norm, scale_ and accumulate over 3 threads (buffers long enough to split): the
    norm of the whole gradient, and every element as one thread makes it."""
    rng = np.random.default_rng(0)
    grad, other = (rng.standard_normal(1_600_001).astype(np.float32) for _ in range(2))
    results = {}
    for n in (1, 3):
        threads(n)
        clipped, total = grad.copy(), np.empty_like(grad)
        with parallel.passes():
            norm = clip_grad_norm(clipped, 1.0)
            accumulate(total, grad, first=True)
            accumulate(total, other, first=False)
            scale_(total, 0.5)
        results[n] = norm, clipped, total
    (norm, clipped, total), (split_norm, split_clipped, split_total) = results[1], results[3]
    assert split_norm == pytest.approx(norm, rel=1e-6) and norm > 1.0
    assert np.linalg.norm(split_clipped.astype(np.float64)) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(split_clipped, clipped, rtol=1e-6)
    np.testing.assert_array_equal(split_total, total)
    np.testing.assert_array_equal(total, (grad + other) * np.float32(0.5))


def test_a_pass_too_short_to_repay_a_thread_runs_whole():
    """The grains give each thread at least tens of microseconds of a pass's work: the char
    model's passes over one sequence of 64 run whole, where GPT-2 124M's over a 512-token
    prefill still split over 16 threads."""
    def parts(n, grain):
        return len(parallel.ranges(n, 16, grain))

    assert parts(64, kernels.row_grain(128)) == 1  # LayerNorm of 64 rows, 128 wide
    assert parts(3 * 128, kernels.column_grain(64, 128)) == 1  # c_attn of 64 rows
    assert parts(4, kernels.pair_grain(64, 64)) == 1  # 4 heads of 64 positions
    assert parts(512, kernels.row_grain(3072)) == 16  # GELU of a 512-token prefill
    assert parts(3 * 768, kernels.column_grain(512, 768)) == 16
    assert parts(3072, kernels.column_grain(512, 768)) == 16
    assert parts(12, kernels.pair_grain(512, 512)) == 12


def test_shards_are_bounded(threads):
    """At most memory.MAX_SHARDS shards, whatever the thread count; none for a wide model."""
    threads(16)
    small = {"n_embd": 128}
    assert len(memory.shards(small, 12)) == memory.MAX_SHARDS
    assert memory.shards({"n_embd": memory.SHARD_MAX_WIDTH + 1}, 12) == [(0, 12)]
    threads(1)
    assert memory.shards(small, 12) == [(0, 12)]


def test_training_losses_depend_on_the_thread_count_only_within_rounding(tmp_path, threads):
    """10 steps at 1, 2 and 4 threads, of a model whose loss splits over the vocabulary and whose
    attention pairs split unevenly: the losses agree within 1e-5 of themselves, and two runs at
    one count give identical parameters."""
    hparams = {"n_vocab": 3000, "n_ctx": 16, "n_embd": 64, "n_head": 2, "n_layer": 2}
    data = np.random.default_rng(0).integers(0, 3000, 400).astype(np.uint16)
    runs = {}
    for n, name in ((1, "a"), (2, "b"), (4, "c"), (4, "d")):
        threads(n)
        trainer = make_trainer(tmp_path / name, hparams, batch_size=3)
        losses = []
        for it in range(10):
            rng = np.random.default_rng([0, it])
            losses.append(trainer.step(*get_batch(data, 16, 3, rng), 1e-3, rng))
        runs[name] = np.array(losses), trainer.flat.copy()
    for name in "bc":
        np.testing.assert_allclose(runs[name][0], runs["a"][0], rtol=1e-5)
    np.testing.assert_array_equal(runs["c"][1], runs["d"][1])


def test_steps_with_dropout_are_reproducible(tmp_path, threads):
    """Dropout draws its masks in order from the step's generator: two runs are equal."""
    threads(3)
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path / name, dropout=0.2)
        data = np.arange(500, dtype=np.uint16) % 11
        for it in range(3):
            rng = np.random.default_rng([0, it])
            trainer.step(*get_batch(data, 16, 5, rng), 1e-2, rng)
        runs.append(trainer.flat.copy())
    np.testing.assert_array_equal(runs[0], runs[1])
