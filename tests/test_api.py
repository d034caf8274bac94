"""The public API: load, generate, stream, samples, cache reuse, errors."""

import shutil
from pathlib import Path

import numpy as np
import pytest

import picogpt
from picogpt.hub import download

TINY = Path(__file__).parent / "fixtures" / "gpt2-tiny"


@pytest.fixture
def tiny():
    return picogpt.load(TINY)


def count_positions(model):
    """Wrap the engine's forward (still running it) to count the positions it processes."""
    counted = []
    forward = model.gpt.forward

    def counting(ids, cache, all_logits=False):
        counted.append(np.asarray(ids).shape[1])
        return forward(ids, cache, all_logits)

    model.gpt.forward = counting
    return counted


def test_hparams_and_tokenizer(tiny):
    assert tiny.hparams == {"n_vocab": 513, "n_ctx": 64, "n_embd": 32, "n_head": 4, "n_layer": 2}
    text = "Hello, world!"
    assert tiny.decode(tiny.encode(text)) == text


def test_generate_is_reproducible_with_a_seed(tiny):
    a = tiny.generate("Hello", n=20, seed=3, stop_at_eos=False)
    b = picogpt.load(TINY).generate("Hello", n=20, seed=3, stop_at_eos=False)
    c = tiny.generate("Hello", n=20, seed=4, stop_at_eos=False)
    assert a == b and a != c
    assert len(tiny.encode(a)) > 0


def test_stream_pieces_join_to_generate(tiny):
    pieces = list(tiny.stream("Once", n=30, seed=5, stop_at_eos=False))
    assert len(pieces) > 1
    assert "".join(pieces) == tiny.generate("Once", n=30, seed=5, stop_at_eos=False)


def test_generate_tokens_are_the_new_ids(tiny):
    prompt = tiny.encode("Once upon")
    out = tiny.generate_tokens(prompt, 12, temperature=0, stop_at_eos=False)
    assert len(out) == 12
    expected, ids = [], list(prompt)
    for _ in range(12):  # greedy by full recompute
        expected.append(int(tiny.logits(ids)[-1].argmax()))
        ids.append(expected[-1])
    assert out == expected


def test_stop_at_eos(tiny):
    eot = tiny.tokenizer.eot_id
    runs = [tiny.generate_tokens([eot], 64, seed=s, temperature=2.0, top_k=0) for s in range(20)]
    assert all(eot not in run for run in runs)
    assert any(len(run) < 64 for run in runs)  # some run met <|endoftext|> and stopped


def test_empty_prompt_starts_from_endoftext(tiny):
    eot = tiny.tokenizer.eot_id
    assert tiny.generate_tokens([], 5, seed=1) == tiny.generate_tokens([eot], 5, seed=1)


def test_batched_samples(tiny):
    greedy = tiny.generate("The cat", n=15, temperature=0, stop_at_eos=False)
    batch = tiny.generate("The cat", n=15, temperature=0, samples=3, stop_at_eos=False)
    assert batch == [greedy] * 3
    rows = tiny.generate_tokens(tiny.encode("The cat"), 30, seed=1, samples=4, stop_at_eos=False)
    assert len(rows) == 4 and all(len(r) == 30 for r in rows)
    assert len({tuple(r) for r in rows}) == 4  # independent draws
    again = tiny.generate_tokens(tiny.encode("The cat"), 30, seed=1, samples=4, stop_at_eos=False)
    assert rows == again


def test_batched_samples_past_the_context(tiny):
    rows = tiny.generate_tokens([7], 150, seed=2, samples=2, stop_at_eos=False)
    assert [len(r) for r in rows] == [150, 150]


def test_cache_reuses_the_common_prefix(tiny):
    counted = count_positions(tiny)
    prompt = tiny.encode("The quick brown fox jumps")
    out = tiny.generate_tokens(prompt, 5, seed=0, stop_at_eos=False)
    assert counted[0] == len(prompt)
    counted.clear()
    # The next turn extends the previous context: only the new tokens run.
    turn = prompt + out + tiny.encode(" over the lazy dog")
    tiny.generate_tokens(turn, 1)
    assert sum(counted) == len(turn) - (len(prompt) + len(out) - 1)
    counted.clear()
    # A prompt that diverges part-way reuses what matches.
    tiny.generate_tokens(prompt[:3] + tiny.encode(" cat"), 1)
    assert sum(counted) == len(tiny.encode(" cat"))


def test_closing_a_stream_early_leaves_the_cache_consistent(tiny):
    stream = tiny.stream("Once upon a time", n=30, seed=1, stop_at_eos=False)
    for _ in zip(range(5), stream):
        pass
    stream.close()
    ids = list(tiny.context)
    counted = count_positions(tiny)
    c = tiny.complete(ids + [10], 1, temperature=0, logprobs=20)
    assert counted == [1]  # the cache held `ids`: only the new token ran
    lp = tiny.logits(ids + [10])[-1].astype(np.float64)
    lp -= lp.max() + np.log(np.exp(lp - lp.max()).sum())
    assert np.allclose(list(c.top_logprobs[0].values()), np.sort(lp)[::-1][:20], atol=1e-5)


def test_argument_errors(tiny):
    with pytest.raises(ValueError, match="temperature"):
        tiny.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        tiny.generate("x", top_p=0)
    with pytest.raises(ValueError, match="n must"):
        tiny.generate("x", n=-1)
    with pytest.raises(ValueError, match="samples"):
        tiny.generate("x", samples=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.generate_tokens([9999], 1)
    with pytest.raises(ValueError, match="1 to 64"):
        tiny.logits(list(range(65)))


def test_load_a_size_from_the_weights_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path))
    shutil.copytree(TINY, tmp_path / "124M")
    m = picogpt.load("gpt2")
    assert m.hparams["n_embd"] == 32
    assert picogpt.generate("Hi", n=3, model="124M", seed=0) == m.generate("Hi", n=3, seed=0)


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("PICOGPT_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(download.ModelNotFoundError, match=str(tmp_path)):
        picogpt.load("355M")
    with pytest.raises(download.ModelNotFoundError, match="not a GPT-2 size"):
        picogpt.load("no-such-model")


def test_folder_errors(tmp_path):
    with pytest.raises(picogpt.ModelError, match="hparams.json"):
        picogpt.load(tmp_path)
    shutil.copytree(TINY, tmp_path / "m")
    (tmp_path / "m" / "encoder.json").unlink()
    with pytest.raises(picogpt.ModelError, match="encoder.json") as e:
        picogpt.load(tmp_path / "m")
    assert isinstance(e.value.__cause__, FileNotFoundError)  # the cause is chained
