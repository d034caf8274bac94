"""The NumPy engine against an independent float64 forward pass and against HuggingFace's GPT-2,
on weights TensorFlow wrote; the KV cache against full recomputes."""

import json
import math
import mmap
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from _damaged import big_endian_over_little, half_weights_with, with_a_nan
from _memory import HAS_SMAPS, resident_kb, vm_flags
from _reference import hf_model

import picogpt
from picogpt.errors import ModelError
from picogpt.formats import tf_checkpoint as checkpoint
from picogpt.generation.chat import Conversation
from picogpt.gpt2 import compact, engine, kernels, memory
from picogpt.gpt2.params import is_matrix, param_shapes

TINY = Path(__file__).parent / "fixtures" / "gpt2-tiny"


@pytest.fixture(scope="module")
def params():
    return checkpoint.read(TINY)


@pytest.fixture(scope="module")
def hparams():
    return json.loads((TINY / "hparams.json").read_text())


@pytest.fixture
def tiny():
    return picogpt.load(TINY)


def reference_logits(params, hparams, ids):
    """GPT-2 written out plainly in float64, one head and one position at a time where it is
    clearer: no cache, no blocks, nothing shared with picogpt.gpt2.engine."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    n_head, T = hparams["n_head"], len(ids)

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    x = p["model/wte"][ids] + p["model/wpe"][:T]
    for i in range(hparams["n_layer"]):
        h = f"model/h{i}/"
        a = ln(x, p[h + "ln_1/g"], p[h + "ln_1/b"])
        q, k, v = np.split(a @ p[h + "attn/c_attn/w"][0] + p[h + "attn/c_attn/b"], 3, axis=-1)
        heads = []
        for hq, hk, hv in zip(*(np.split(t, n_head, axis=-1) for t in (q, k, v))):
            scores = hq @ hk.T / math.sqrt(hq.shape[-1])
            scores[np.triu_indices(T, 1)] = -np.inf
            w = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(w / w.sum(-1, keepdims=True) @ hv)
        x = x + np.hstack(heads) @ p[h + "attn/c_proj/w"][0] + p[h + "attn/c_proj/b"]
        m = ln(x, p[h + "ln_2/g"], p[h + "ln_2/b"])
        m = gelu(m @ p[h + "mlp/c_fc/w"][0] + p[h + "mlp/c_fc/b"])
        x = x + m @ p[h + "mlp/c_proj/w"][0] + p[h + "mlp/c_proj/b"]
    return ln(x, p["model/ln_f/g"], p["model/ln_f/b"]) @ p["model/wte"].T


def relative_error(got, expected):
    return np.abs(got - expected).max() / np.abs(expected).max()


def test_forward_matches_float64_reference(tiny, params, hparams):
    ids = np.random.default_rng(0).integers(0, hparams["n_vocab"], hparams["n_ctx"]).tolist()
    got = tiny.logits(ids)
    assert got.dtype == np.float32 and got.shape == (len(ids), hparams["n_vocab"])
    assert relative_error(got, reference_logits(params, hparams, ids)) < 1e-5


def test_logits_match_huggingface(tiny, params, hparams):
    hf, torch = hf_model(params, hparams)
    ids = np.random.default_rng(1).integers(0, hparams["n_vocab"], 50).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    assert relative_error(tiny.logits(ids), expected) < 1e-4


def test_greedy_continuation_matches_huggingface(tiny, params, hparams):
    hf, torch = hf_model(params, hparams)
    prompt = tiny.encode("The quick brown fox")
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    got = tiny.generate_tokens(prompt, 30, temperature=0, stop_at_eos=False)
    assert got == ids[len(prompt) :]


def test_kv_cache_equals_full_recompute_at_every_step_across_the_window(tiny, hparams):
    n_ctx = hparams["n_ctx"]
    chunks = tiny.stream_completion("Once upon a time", 2 * n_ctx + 10, temperature=0,
                                    logprobs=20, stop_at_eos=False)
    slid, before = 0, 0
    for chunk in chunks:
        if chunk.finish_reason:
            break
        # Paused here, the cache holds the context whose logits gave this chunk's token.
        context = list(tiny.context)
        slid += len(context) < before
        before = len(context)
        assert len(context) <= n_ctx
        full = tiny.logits(context)[-1].astype(np.float64)
        full -= full.max() + np.log(np.exp(full - full.max()).sum())  # log-softmax
        assert chunk.tokens == [int(full.argmax())]
        got = np.array(list(chunk.top_logprobs[0].values()))
        assert np.abs(got - np.sort(full)[::-1][:20]).max() < 1e-5
    assert slid >= 2  # the window really moved, more than once


def test_generation_runs_far_past_the_context(tiny, hparams):
    out = tiny.generate_tokens([5], 3 * hparams["n_ctx"], seed=0, stop_at_eos=False)
    assert len(out) == 3 * hparams["n_ctx"]


def test_row_blocks_give_the_same_logits(tiny, monkeypatch, hparams):
    ids = np.random.default_rng(2).integers(0, hparams["n_vocab"], hparams["n_ctx"]).tolist()
    whole = tiny.logits(ids)
    monkeypatch.setattr(engine, "ATTN_BLOCK_BYTES", 1)  # one query row at a time
    monkeypatch.setattr(engine, "LOGITS_BLOCK_ROWS", 7)
    assert np.array_equal(np.argmax(tiny.logits(ids), -1), np.argmax(whole, -1))
    assert relative_error(tiny.logits(ids), whole) < 1e-6


def test_attention_blocks_never_hold_the_whole_score_matrix(monkeypatch):
    seen = []
    real_exp = kernels.shifted_exp_

    def recording_exp(x):
        seen.append(x.shape)
        return real_exp(x)

    monkeypatch.setattr(kernels, "shifted_exp_", recording_exp)
    monkeypatch.setattr(engine, "ATTN_BLOCK_BYTES", 64 * 4 * 4 * 16)  # 16 rows of 64 keys, 4 heads
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 4, 64, 8)).astype(np.float32) for _ in range(3))
    blocked = engine.attention(q, k, v, 0)
    assert max(s[2] for s in seen) <= 16
    monkeypatch.setattr(engine, "ATTN_BLOCK_BYTES", 1 << 30)
    assert np.allclose(blocked, engine.attention(q, k, v, 0), atol=1e-6)


def test_everything_stays_float32(tiny):
    for value in tiny.gpt.blocks[0].values():
        assert all(v.dtype == np.float32 for v in value)
    assert tiny.logits([1, 2, 3]).dtype == np.float32
    assert tiny.gpt.forward(np.array([[1, 2, 3]]), tiny.gpt.new_cache()).dtype == np.float32


@pytest.mark.parametrize("order", ["C", "F"])  # dot products along rows, or column updates
@pytest.mark.parametrize("rows", [1, 2, 4, 8, 9, 300])
def test_matmul_takes_every_path_to_the_same_product(monkeypatch, rows, order):
    monkeypatch.setattr(kernels, "MATVEC_CHUNK_BYTES", 7 * 40 * 4)  # 7 weight rows: 15 chunks
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 40)).astype(np.float32)
    wt = np.asarray(rng.standard_normal((100, 40)), np.float32, order=order)
    expected = x.astype(np.float64) @ wt.T.astype(np.float64)
    assert np.allclose(kernels.matmul(x, wt), expected, rtol=1e-4, atol=1e-4)
    out = np.full((rows, 100), np.nan, np.float32)
    assert kernels.matmul(x, wt, out=out) is out
    assert np.allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
@pytest.mark.parametrize("order", ["C", "F"])
def test_streaming_copy_keeps_the_longer_dimension_contiguous(shape, order):
    wt = np.asarray(np.random.default_rng(0).standard_normal(shape), np.float32, order=order)
    got = engine.streaming_copy(wt)
    assert np.array_equal(got, wt) and not np.shares_memory(got, wt)
    rows_of = got if got.flags.c_contiguous else got.T  # the copy's own contiguous rows
    assert rows_of.flags.c_contiguous and rows_of.shape[1] == max(shape)


@pytest.mark.parametrize("weights", ["float32", "float16"])  # a float16 file's widened at load
def test_the_engine_streams_each_matrix_along_its_longer_dimension(params, hparams, weights):
    params = {name: value.astype(weights) if is_matrix(name) else value
              for name, value in params.items()}  # fmt: skip
    gpt = engine.GPT(params, hparams, dtype="float32")
    for wt in [*(gpt.blocks[0][name][0] for name in ("c_attn", "c_proj", "c_fc", "mlp_proj")),
               gpt.wte]:  # fmt: skip
        rows_of = wt if wt.flags.c_contiguous else wt.T
        assert rows_of.flags.c_contiguous and rows_of.shape[1] == max(wt.shape)
        assert rows_of.dtype == np.float32
    n_embd = gpt.hparams["n_embd"]
    assert gpt.blocks[0]["c_fc"][0].shape == (4 * n_embd, n_embd)  # still [n_out, n_in]


def buffer_of(a):
    """The array whose memory `a` views (a itself where it owns its memory)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


@pytest.mark.parametrize("weights", ["float32", "float16"])  # a float16 file's widened at load
def test_the_engines_float32_matrices_share_one_buffer_on_huge_pages(params, hparams, weights):
    params = {name: value.astype(weights) if is_matrix(name) else value
              for name, value in params.items()}  # fmt: skip
    gpt = engine.GPT(params, hparams, dtype="float32")
    names = ("c_attn", "c_proj", "c_fc", "mlp_proj")
    matrices = [blk[name][0] for blk in gpt.blocks for name in names] + [gpt.wte]
    assert len({id(buffer_of(wt)) for wt in matrices}) == 1
    spans = sorted((wt.ctypes.data, wt.ctypes.data + wt.nbytes) for wt in matrices)  # contiguous
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # none overlap
    assert all(start % memory.ARENA_ALIGN == 0 for start, _ in spans)
    if HAS_SMAPS and hasattr(mmap, "MADV_HUGEPAGE"):
        assert spans[0][0] % memory.HUGE_PAGE == 0  # the first array starts the buffer
        assert "hg" in vm_flags(spans[0][0])  # advised: the kernel may give it 2 MB pages


def test_an_arena_carves_aligned_arrays_in_turn_and_says_when_it_is_full():
    arena = memory.Arena(memory.huge_page_buffer(memory.Arena.bytes_for([3, 5])))
    a, b = arena.empty((3,)), arena.empty((5,))
    assert b.ctypes.data - a.ctypes.data == memory.ARENA_ALIGN
    a[:], b[:] = 1, 2  # writable, and apart
    assert a.tolist() == [1] * 3 and b.tolist() == [2] * 5
    with pytest.raises(MemoryError, match="no room"):
        arena.empty((1,))


@pytest.mark.parametrize("shape", [(1, 1), (15, 7), (16, 3), (17, 40), (100, 33), (0, 4)])
def test_transposed_copies_exactly(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = engine.transposed(w)
    assert got.flags.c_contiguous and np.array_equal(got, w.T)


@pytest.mark.skipif(not HAS_SMAPS, reason="needs Linux's smaps")
def test_loading_keeps_no_second_copy_of_the_block_weights(tmp_path, hparams):
    # The blocks' weights are copied into [n_out, n_in] order; the mapped file's pages they were
    # copied from must not stay resident too, or loading GPT-2 would hold its weights twice.
    big = dict(hparams, n_embd=256, n_head=4, n_layer=2)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) * 0.02
               for name, shape in param_shapes(big).items()}  # fmt: skip
    checkpoint.write(tmp_path / "model.ckpt", tensors)
    params = checkpoint.read(tmp_path)
    gpt = engine.GPT(params, big, release=checkpoint.release)  # as the loader does
    block_kb = sum(v.nbytes for k, v in tensors.items() if k.startswith("model/h")) >> 10
    assert block_kb > 4096
    assert resident_kb(tmp_path / "model.ckpt.data-00000-of-00001") < 256
    ids = rng.integers(0, big["n_vocab"], (1, 20))
    got = gpt.forward(ids, gpt.new_cache(), all_logits=True)[0]
    assert relative_error(got, reference_logits(tensors, big, ids[0].tolist())) < 1e-5


def test_weights_stay_mapped_when_memory_is_short(monkeypatch, params, hparams):
    reordered = engine.GPT(params, hparams)
    monkeypatch.setattr(memory, "physical_memory", lambda: 64 << 10)  # less than twice the blocks
    mapped = engine.GPT(params, hparams)
    assert reordered.reordered and not mapped.reordered
    wt = mapped.blocks[0]["c_fc"][0]
    assert wt.shape == (4 * hparams["n_embd"], hparams["n_embd"])
    assert np.shares_memory(wt, params["model/h0/mlp/c_fc/w"])
    ids = np.random.default_rng(4).integers(0, hparams["n_vocab"], (3, 9))  # the few-row path
    for T in (9, 1):  # a prefill of 27 rows, then one step of 3 rows
        got = mapped.forward(ids[:, :T], mapped.new_cache(3), all_logits=True)
        expected = reordered.forward(ids[:, :T], reordered.new_cache(3), all_logits=True)
        assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("damage, said", [
    ("encoder", "encoder.json"), ("hparams", "n_layer"),
    ("vocab", "vocab.bpe: GPT-2's vocabulary file does not exist"),
    ("empty", "not a model folder (no hparams.json, nor the HuggingFace layout's config.json)"),
])  # fmt: skip
def test_a_bad_folder_is_named_once(tmp_path, damage, said):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    if damage == "encoder":  # the error names the file
        (folder / "encoder.json").write_text('{"a": 1')
    elif damage == "hparams":  # the error names no file: the folder is put before it
        hparams = json.loads((folder / "hparams.json").read_text())
        (folder / "hparams.json").write_text(json.dumps(dict(hparams, n_layer=3)))
    elif damage == "vocab":
        (folder / "vocab.bpe").unlink()
    else:
        shutil.rmtree(folder)
        folder.mkdir()
    with pytest.raises(ModelError) as e:
        picogpt.load(folder)
    assert str(e.value).count(str(folder)) == 1, str(e.value)
    assert said in str(e.value) and "Errno" not in str(e.value)


def test_a_folder_named_like_its_tensors_is_still_named(tmp_path, monkeypatch, params):
    # A relative folder "model", whose error speaks of tensor 'model/h0/...' but of no file.
    monkeypatch.chdir(tmp_path)
    shutil.copytree(TINY, "model", ignore=shutil.ignore_patterns("model.ckpt*"))
    tensors = {name: np.array(value) for name, value in params.items()}
    tensors["model/h0/mlp/c_fc/w"][0, 0, 0] = 1e6  # beyond float16's range
    checkpoint.write(Path("model") / "model.ckpt", tensors)
    with pytest.raises(ModelError, match=r"^model: tensor 'model/h0/mlp/c_fc/w': values beyond"):
        picogpt.load(Path("model"), dtype="float16")


def test_wrong_shapes_are_named(params, hparams):
    bad = dict(params)
    bad["model/h1/mlp/c_fc/b"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="model/h1/mlp/c_fc/b"):
        engine.GPT(bad, hparams)
    with pytest.raises(ValueError, match="n_head"):
        engine.GPT(params, dict(hparams, n_head=5))


# --- weights that give non-finite logits ------------------------------------------------------

LONG_PROMPT = "a prompt of more than eight tokens, so its prefill runs on every core"


def every_way_to_run(m):
    """Each API call that runs the network, by name."""
    chat = Conversation(m, 4)
    return {
        "generate": lambda: m.generate("Hello", n=3, seed=1),
        "greedy": lambda: m.generate("Hello", n=3, temperature=0),
        "stream": lambda: list(m.stream("Hello", n=3, seed=1)),
        "complete": lambda: m.complete("Hello", n=3, logprobs=2, samples=2, seed=1),
        "prefill on every core": lambda: m.generate(LONG_PROMPT, n=2, seed=1),
        "logits": lambda: m.logits(m.encode(LONG_PROMPT)),
        "log_likelihood": lambda: m.log_likelihood(LONG_PROMPT),
        "chat": lambda: list(m.stream(chat.prompt("Hi!"), n=3, stop=["\n"])),
    }


@pytest.mark.parametrize("damage", [with_a_nan, big_endian_over_little])
def test_weights_that_give_non_finite_logits_are_a_model_error(tmp_path, threads, damage):
    threads(2)  # a long prefill runs on the pool's threads too: no warning from them either
    folder = damage(tmp_path / "damaged")
    m = picogpt.load(folder)
    for name, call in every_way_to_run(m).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a NumPy RuntimeWarning on the way fails the test
            with pytest.raises(ModelError, match="look damaged") as info:
                call()
        assert str(folder) in str(info.value) and "picogpt verify" in str(info.value), name
    assert m.generate("Hello", n=0) == ""  # nothing ran, nothing to check


@pytest.mark.parametrize("value", [np.inf, np.nan])
@pytest.mark.parametrize("dtype", compact.DTYPES)
def test_a_non_finite_weight_gives_a_model_error_in_every_dtype(tmp_path, threads, value, dtype):
    """A float16 weight that is infinite or NaN is caught by the logits check whatever the
    weights are kept in: float16's widening keeps it non-finite, int8's block scale turns NaN."""
    threads(2)
    folder = half_weights_with(tmp_path / "damaged", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none from loading either
        m = picogpt.load(folder, dtype=dtype)
    for name, call in every_way_to_run(m).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ModelError, match="look damaged"):
                call()
                pytest.fail(f"{name}: no error")


def test_finite_logits_pass_the_check(tiny, threads):
    threads(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for call in every_way_to_run(tiny).values():
            call()


@pytest.mark.parametrize("C", [64, 768])
def test_layer_norm_of_one_row_is_the_formula_of_rows(C):
    rng = np.random.default_rng(C)
    x = (rng.standard_normal((3, C)) * 3 + 1).astype(np.float32)  # a mean and a spread to remove
    g, b = rng.standard_normal((2, C)).astype(np.float32)
    before, x64 = x.copy(), x.astype(np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    expected = expected * g + b
    rows = kernels.layer_norm(x, g, b)
    for i in range(3):
        one = kernels.layer_norm(x[None, i : i + 1], g, b)  # [1, 1, C]: a decoding step's
        assert one.shape == (1, 1, C) and one.dtype == np.float32
        assert np.allclose(one[0, 0], expected[i], rtol=1e-5, atol=1e-5)
        assert np.allclose(one[0, 0], rows[i], rtol=1e-5, atol=1e-5)
    assert np.array_equal(x, before)  # a new array: x itself untouched


@pytest.mark.parametrize("weights", ["float32", "float16"])  # a float16 file's widened at load
def test_a_decoding_step_is_a_row_of_the_rows_forward(params, hparams, weights):
    params = {name: value.astype(weights) if is_matrix(name) else value
              for name, value in params.items()}  # fmt: skip
    gpt = engine.GPT(params, hparams, dtype="float32")
    prompt = np.array([[5, 17, 3]])
    one, two = gpt.new_cache(), gpt.new_cache(batch=2)  # one token a step, or two rows of it
    gpt.forward(prompt, one)
    gpt.forward(np.repeat(prompt, 2, axis=0), two)
    for token in (99, 42, 7):
        step = gpt.forward(np.array([[token]]), one)  # [1, V]
        rows = gpt.forward(np.array([[token], [token]]), two)  # [2, V]
        assert step.shape == (1, hparams["n_vocab"]) and step.dtype == np.float32
        assert np.allclose(step[0], rows[0], rtol=0, atol=1e-5 * np.abs(rows).max())
    assert one.length == two.length == 6
    for layer in range(hparams["n_layer"]):  # the same keys and values appended
        assert np.allclose(one.k[layer][0, :, :6], two.k[layer][0, :, :6], atol=1e-6)
        assert np.allclose(one.v[layer][0, :, :6], two.v[layer][0, :, :6], atol=1e-6)
    last = gpt.forward(np.array([[8]]), one, all_logits=True)
    assert last.shape == (1, 1, hparams["n_vocab"])
    assert np.allclose(last[0, 0], gpt.forward(np.array([[8], [8]]), two)[0], rtol=0,
                       atol=1e-5 * np.abs(last).max())  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_a_prefill_for_its_last_logits_is_the_last_row_of_all_of_them(params, hparams, threads,
                                                                      dtype):
    """Without all_logits the last block computes the last position alone: its logits are the
    last row of all_logits's, and both leave the same keys and values in the cache (within
    rounding: the keys' and values' product is split apart from the queries'), so the steps after
    agree too; after an earlier prefill as well (a cache already holding positions)."""
    gpt = engine.GPT(params, hparams, dtype=dtype)
    ids = np.random.default_rng(3).integers(0, hparams["n_vocab"], (2, 30))
    for n in (1, 3):
        threads(n)
        last, every = gpt.new_cache(2), gpt.new_cache(2)
        for chunk in (ids[:, :20], ids[:, 20:29]):  # 40 rows, then 18: split, both
            got = gpt.forward(chunk, last)  # [B, V]
            expected = gpt.forward(chunk, every, all_logits=True)[:, -1]
            assert got.shape == expected.shape == (2, hparams["n_vocab"])
            assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
        assert last.length == every.length == 29
        for layer in range(hparams["n_layer"]):
            for got, expected in ((last.k[layer], every.k[layer]), (last.v[layer], every.v[layer])):
                got, expected = got[:, :, :29], expected[:, :, :29]  # (products split otherwise)
                assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
        step = gpt.forward(ids[:, 29:], last)
        assert np.abs(step - gpt.forward(ids[:, 29:], every)).max() <= 1e-5 * np.abs(step).max()


def test_a_vocabulary_that_does_not_hold_together_names_its_folder_once(tmp_path):
    folder = tmp_path / "tiny"
    shutil.copytree(TINY, folder)
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").rstrip("\n").split("\n")
    (folder / "vocab.bpe").write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
    with pytest.raises(ModelError, match="cut short") as e:  # the tables together: the folder
        picogpt.load(folder)
    assert str(e.value).startswith(f"{folder}: ") and str(e.value).count(str(folder)) == 1
