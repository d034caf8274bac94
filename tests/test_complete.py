"""Generation controls: stop strings, frequency/presence penalties, logprobs, `Model.complete`
and `Model.stream_completion`, batched samples with all of them (gpt2-tiny: random weights, the
real GPT-2 vocabulary)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import picogpt
from picogpt.generation import decoding, sampling

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "gpt2-tiny"


@pytest.fixture(scope="module")
def tiny():
    return picogpt.load(TINY)


@pytest.fixture(scope="module")
def chars():
    return picogpt.load("shakespeare-char")


def log_softmax(logits):
    x = np.asarray(logits, dtype=np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


def reference_penalised(model, prompt, n, fp, pp, temperature=0.0, top_k=None, top_p=None,
                        seed=None):
    """Decoding by full recompute: the logits of the whole sequence at every step, OpenAI's
    formula over this sample's own counts, then temperature/top-k/top-p (or argmax)."""
    ids, counts = list(prompt), np.zeros(model.hparams["n_vocab"])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        logits = model.logits(ids)[-1].astype(np.float64)
        logits = logits - counts * fp - (counts > 0) * pp
        if temperature == 0:
            token = int(np.argmax(logits))
        else:
            keep, p = sampling.candidates(logits, temperature, top_k, top_p)
            token = int(keep[rng.choice(len(p), p=p)])
        out.append(token)
        ids.append(token)
        counts[token] += 1
    return out


# --- penalties ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp, pp", [(0.8, 0.0), (0.0, 1.5), (0.5, 0.5), (-0.5, 0.0), (2.0, -2.0)])
def test_penalised_greedy_equals_the_formula_recomputed_from_scratch(tiny, fp, pp):
    prompt = tiny.encode("The cat sat on")
    got = tiny.generate_tokens(prompt, 40, temperature=0, stop_at_eos=False,
                               frequency_penalty=fp, presence_penalty=pp)
    assert got == reference_penalised(tiny, prompt, 40, fp, pp)


def test_penalties_change_greedy_decoding(tiny):
    prompt = tiny.encode("The cat sat on")
    plain = tiny.generate_tokens(prompt, 40, temperature=0, stop_at_eos=False)
    penalised = tiny.generate_tokens(prompt, 40, temperature=0, stop_at_eos=False,
                                     frequency_penalty=1.0)
    assert penalised != plain
    # Random weights repeat themselves greedily; a strong penalty spreads the tokens out.
    assert len(set(penalised)) > len(set(plain))


def test_penalties_come_before_temperature_and_top_k(tiny):
    prompt = tiny.encode("Once upon a time")
    got = tiny.generate_tokens(prompt, 30, temperature=0.7, top_k=5, seed=3, stop_at_eos=False,
                               frequency_penalty=1.2, presence_penalty=0.4)
    assert got == reference_penalised(tiny, prompt, 30, 1.2, 0.4, 0.7, 5, None, seed=3)


def test_batched_samples_keep_their_own_counts(tiny):
    prompt = tiny.encode("Once upon a time")
    options = dict(temperature=1.0, top_k=20, frequency_penalty=1.0, presence_penalty=0.5,
                   stop_at_eos=False)
    rows = tiny.generate_tokens(prompt, 25, seed=10, samples=3, **options)
    for k, row in enumerate(rows):  # sample k is a run of its own with seed 10 + k
        assert row == reference_penalised(tiny, prompt, 25, 1.0, 0.5, 1.0, 20, seed=10 + k)
    greedy = tiny.generate_tokens(prompt, 25, temperature=0, samples=3, stop_at_eos=False,
                                  frequency_penalty=1.0)
    assert greedy == [reference_penalised(tiny, prompt, 25, 1.0, 0.0)] * 3


# --- logprobs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_the_log_softmax_of_the_logits_at_each_position(tiny, k):
    prompt = tiny.encode("Hello world")
    c = tiny.complete(prompt, 30, seed=4, logprobs=k, stop_at_eos=False, temperature=1.3,
                      frequency_penalty=0.7)  # neither changes the reported probabilities
    assert len(c.tokens) == len(c.token_logprobs) == len(c.top_logprobs) == 30
    full = log_softmax(tiny.logits(prompt + c.tokens))
    for i, (token, lp, top) in enumerate(zip(c.tokens, c.token_logprobs, c.top_logprobs)):
        row = full[len(prompt) - 1 + i]
        assert abs(lp - row[token]) < 1e-5
        expected = np.argsort(-row, kind="stable")[:k]
        assert list(top) == [tiny.token_text(int(j)) for j in expected]
        assert np.allclose(list(top.values()), row[expected], atol=1e-5)


def test_logprobs_of_batched_samples_and_streams(tiny):
    prompt = tiny.encode("Hello")
    batch = tiny.complete(prompt, 12, seed=2, logprobs=3, samples=3, stop_at_eos=False)
    for c in batch:
        full = log_softmax(tiny.logits(prompt + c.tokens))
        positions = np.arange(len(prompt) - 1, len(prompt) - 1 + len(c.tokens))
        assert np.allclose(c.token_logprobs, full[positions, c.tokens], atol=1e-5)
        assert all(len(top) == 3 for top in c.top_logprobs)
    chunks = list(tiny.stream_completion(prompt, 12, seed=2, logprobs=3, samples=3,
                                         stop_at_eos=False))
    for k, c in enumerate(batch):
        mine = [ch for ch in chunks if ch.index == k]
        assert sum((ch.token_logprobs for ch in mine), []) == c.token_logprobs
        assert mine[-1].finish_reason == "length" and mine[-1].tokens == []


def test_token_texts_are_distinct_and_mark_partial_bytes(tiny):
    texts = [tiny.token_text(i) for i in range(tiny.hparams["n_vocab"])]
    assert len(set(texts)) == len(texts)
    assert tiny.token_text(tiny.encode(" the")[0]) == " the"
    partial = [t for t in texts if t.startswith("bytes:")]
    assert partial and all(t.startswith("bytes:\\x") for t in partial)


# --- stop strings ---------------------------------------------------------------------------------

def pieces_of(model, prompt, n, **options):
    """The decoded text of each generated token (their concatenation is the text)."""
    c = model.complete(prompt, n, stop_at_eos=False, **options)
    return c, [model.decode([t]) for t in c.tokens]


def test_a_stop_string_across_a_token_boundary(chars):
    c, pieces = pieces_of(chars, "ROMEO:", 80, seed=1)
    i = next(i for i in range(5, 79) if pieces[i] != pieces[i + 1])
    stop = pieces[i] + pieces[i + 1]  # ends in token i + 1: it spans two tokens
    full = c.text
    cut = full.find(stop)
    got = chars.complete("ROMEO:", 80, seed=1, stop=stop, stop_at_eos=False)
    assert got.text == full[:cut] and got.finish_reason == "stop"
    # Tokens through the one that completed the stop string.
    ends = np.cumsum([len(p) for p in pieces])
    assert got.tokens == c.tokens[: int(np.searchsorted(ends, cut + len(stop))) + 1]
    assert got.prompt_tokens == len("ROMEO:")


def test_a_bpe_stop_string_inside_and_across_tokens(tiny):
    full = tiny.complete("Once upon a time", 40, seed=5, stop_at_eos=False)
    assert full.finish_reason == "length"
    pieces = [tiny.decode([t]) for t in full.tokens]
    i = next(i for i in range(3, 39) if len(pieces[i]) > 1 and "\ufffd" not in pieces[i]
             and "\ufffd" not in pieces[i + 1] and pieces[i + 1])
    for stop in (pieces[i][1:] + pieces[i + 1][:1], pieces[i][-1]):
        got = tiny.complete("Once upon a time", 40, seed=5, stop=stop, stop_at_eos=False)
        assert got.text == full.text[: full.text.find(stop)] and got.finish_reason == "stop"


def test_the_first_of_several_stop_strings_ends_the_text(chars):
    full = chars.complete("ROMEO:", 120, seed=2, stop_at_eos=False).text
    stops = ["\n\n", "the", "e"]
    cut = min(full.find(s) for s in stops if s in full)
    got = chars.complete("ROMEO:", 120, seed=2, stop=stops, stop_at_eos=False)
    assert got.text == full[:cut]
    assert chars.generate("ROMEO:", 120, seed=2, stop=stops, stop_at_eos=False) == full[:cut]
    assert chars.complete("ROMEO:", 120, seed=2, stop="zzzz", stop_at_eos=False).text == full


def test_a_stream_never_shows_the_start_of_a_stop_string(chars):
    c, pieces = pieces_of(chars, "JULIET:", 100, seed=7)
    full = c.text
    # A stop that begins with two characters the text holds but never occurs whole: its
    # beginning is held back each time, then released.
    i = next(i for i in range(10, 99) if pieces[i] != pieces[i + 1])
    begin = pieces[i] + pieces[i + 1]
    stop = begin + "\x00"
    assert begin in full and stop not in full
    shown, ends = "", np.cumsum([len(p) for p in pieces])
    for k, chunk in enumerate(chars.stream_completion("JULIET:", 100, seed=7, stop=stop,
                                                      stop_at_eos=False)):
        shown += chunk.text
        assert full.startswith(shown)
        if k == i:  # after token i, its character may begin the stop: it is held back
            assert len(shown) == ends[i] - 1
        if k == i + 1:
            assert len(shown) == ends[i + 1] - 2
    assert shown == full
    # With a stop string that does occur, the stream ends at it and never shows any of it.
    shown = ""
    for chunk in chars.stream_completion("JULIET:", 100, seed=7, stop=begin, stop_at_eos=False):
        shown += chunk.text
        assert full[: full.find(begin)].startswith(shown)
    assert shown == full[: full.find(begin)] and chunk.finish_reason == "stop"
    assert "".join(chars.stream("JULIET:", 100, seed=7, stop=begin, stop_at_eos=False)) == shown


def test_each_batched_sample_ends_at_its_own_stop_string(chars):
    singles = [chars.complete("ROMEO:", 60, seed=20 + k, stop_at_eos=False).text
               for k in range(4)]
    stop = "e "
    assert 0 < sum(stop in s for s in singles)
    batch = chars.complete("ROMEO:", 60, seed=20, samples=4, stop=stop, stop_at_eos=False)
    for single, c in zip(singles, batch):
        if stop in single:
            assert c.text == single[: single.find(stop)] and c.finish_reason == "stop"
        else:
            assert c.text == single and c.finish_reason == "length"
    streamed = {}
    for chunk in chars.stream_completion("ROMEO:", 60, seed=20, samples=4, stop=stop,
                                         stop_at_eos=False):
        streamed[chunk.index] = streamed.get(chunk.index, "") + chunk.text
    assert [streamed[k] for k in range(4)] == [c.text for c in batch]


def test_endoftext_is_a_stop_and_not_a_token(tiny):
    eot = tiny.tokenizer.eot_id
    for seed in range(40):
        c = tiny.complete([eot], 64, seed=seed, temperature=2.0, top_k=0)
        if c.finish_reason == "stop":
            break
    assert c.finish_reason == "stop" and eot not in c.tokens and len(c.tokens) < 64
    assert c.text == tiny.decode(c.tokens)


# --- the rest of the interface --------------------------------------------------------------------

def test_complete_matches_generate_and_stream(tiny):
    c = tiny.complete("Hello", 20, seed=9, stop_at_eos=False)
    assert c.text == tiny.generate("Hello", 20, seed=9, stop_at_eos=False)
    assert c.text == "".join(tiny.stream("Hello", 20, seed=9, stop_at_eos=False))
    assert c.tokens == tiny.generate_tokens(tiny.encode("Hello"), 20, seed=9, stop_at_eos=False)
    assert c.token_logprobs is None and c.top_logprobs is None
    assert isinstance(c, picogpt.Completion) and c.prompt_tokens == len(tiny.encode("Hello"))
    assert tiny.complete("Hello", 0).tokens == [] and tiny.complete("Hello", 0).text == ""


def test_sample_k_is_the_single_run_with_seed_plus_k(tiny):
    batch = tiny.complete("Hi", 15, seed=30, samples=3, stop_at_eos=False)
    assert [c.tokens for c in batch] == [
        tiny.complete("Hi", 15, seed=30 + k, stop_at_eos=False).tokens for k in range(3)]
    assert len({tuple(c.tokens) for c in batch}) == 3


def test_closing_a_stream_stops_the_generation_and_keeps_the_cache_true(tiny):
    prompt = tiny.encode("Once upon a time")
    stream = tiny.stream_completion(prompt, 30, seed=1, stop_at_eos=False, logprobs=20)
    got = [chunk.tokens[0] for _, chunk in zip(range(5), stream)]
    stream.close()
    assert list(tiny.context)[: len(prompt)] == prompt
    assert list(tiny.context) == prompt + got[:-1]  # the last token was never fed
    # The next call continues the cached context; its log-probabilities are the true ones.
    ids = list(tiny.context) + [10]
    c = tiny.complete(ids, 1, temperature=0, logprobs=20)
    row = log_softmax(tiny.logits(ids))[-1]
    assert np.allclose(list(c.top_logprobs[0].values()), np.sort(row)[::-1][:20], atol=1e-5)


def test_samples_run_in_groups_of_bounded_memory(tiny, monkeypatch):
    batches = []
    forward = tiny.gpt.forward

    def recording(ids, cache, all_logits=False):
        batches.append(np.asarray(ids).shape[0])
        return forward(ids, cache, all_logits)

    monkeypatch.setattr(tiny.gpt, "forward", recording)
    monkeypatch.setattr(decoding, "MAX_GROUP", 4)
    out = tiny.complete("Hi", 6, seed=40, samples=10, stop_at_eos=False)
    assert max(batches) == 4 and len(out) == 10
    monkeypatch.setattr(tiny.gpt, "forward", forward)
    monkeypatch.setattr(decoding, "MAX_GROUP", 256)
    # The groups change nothing: sample k still draws from seed + k.
    assert [c.tokens for c in out] == [c.tokens for c in
                                       tiny.complete("Hi", 6, seed=40, samples=10,
                                                     stop_at_eos=False)]
    assert tiny.sample_groups(10**6, 64) == 256 and tiny.sample_groups(3, 64) == 3
    # The memory bound: 2 layers x keys and values x 64 positions x 32 floats, plus vocab rows.
    per_row = 2 * 2 * 64 * 32 * 4 + 8 * 513 * 8
    monkeypatch.setattr(decoding, "SAMPLES_MEMORY", 3 * per_row)
    assert tiny.sample_groups(10**6, 64) == 3 and tiny.sample_groups(10**6, 10**9) == 1


def test_ten_thousand_samples_stay_within_bounded_memory():
    code = ("import picogpt\n"
            f"m = picogpt.load({str(TINY)!r})\n"
            "out = m.generate('Hello', n=4, samples=10**4, seed=0, stop_at_eos=False)\n"
            "assert len(out) == 10**4\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")  # memory, not speed
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    # KB. As one batch of 10**4 rows this took 416 MB (4.7 GB with longer runs); in groups 53 MB.
    assert int(out.stdout) < 160 * 1024


# --- bad options ----------------------------------------------------------------------------------

BAD = [
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(presence_penalty=float("inf")), "presence_penalty"),
    (dict(presence_penalty=True), "presence_penalty"),
    (dict(stop=5), "stop"),
    (dict(stop=["a", 1]), "stop"),
    (dict(stop=[f"s{i}" for i in range(17)]), "stop"),
    (dict(stop=""), "stop"),
    (dict(stop=b"x"), "stop"),
    (dict(logprobs=-1), "logprobs"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=2.0), "logprobs"),
    (dict(logprobs=True), "logprobs"),
    (dict(seed=-1), "seed"),
    (dict(samples=0), "samples"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=True), "top_k"),
]


@pytest.mark.parametrize("options, name", BAD)
def test_bad_options_are_value_errors_naming_the_option(tiny, options, name):
    with pytest.raises(ValueError, match=name):
        tiny.complete("Hi", 3, **options)
    with pytest.raises(ValueError, match=name):  # checked when called, before any token
        tiny.stream_completion("Hi", 3, **options)
    if "logprobs" not in options:
        with pytest.raises(ValueError, match=name):
            tiny.generate("Hi", 3, **options)
    if "logprobs" not in options and "stop" not in options:
        with pytest.raises(ValueError, match=name):
            tiny.generate_tokens([1, 2], 3, **options)


def test_numpy_numbers_are_numbers(tiny):
    plain = tiny.complete("Hi", 3, seed=2, temperature=0.5, top_k=5, top_p=0.9, samples=2)
    numpy = tiny.complete("Hi", np.int64(3), seed=np.uint32(2), temperature=np.float32(0.5),
                          top_k=np.int16(5), top_p=np.float64(0.9), samples=np.int8(2))
    assert [c.tokens for c in numpy] == [c.tokens for c in plain]


@pytest.mark.parametrize("prompt", [b"Hi", 5, None, [1.7, 2.2], [True, False], [[1, 2]]])
def test_a_prompt_that_is_neither_text_nor_token_ids_is_a_type_error(tiny, prompt):
    with pytest.raises(TypeError, match="a prompt is a str|token ids are integers"):
        tiny.complete(prompt, 2)
    if not isinstance(prompt, (bytes, int)) and prompt is not None:
        with pytest.raises(TypeError, match="token ids are integers"):
            tiny.logits(prompt)
    assert tiny.logits(np.array([1, 2, 3])).shape[0] == 3  # a NumPy array of ids is ids


def test_good_edge_options_are_accepted(tiny):
    tiny.complete("Hi", 2, frequency_penalty=-2, presence_penalty=2, logprobs=20,
                  stop=[f"s{i}" for i in range(16)])
    tiny.complete("Hi", 2, frequency_penalty=np.float32(0.5), logprobs=0, stop=("x",))
