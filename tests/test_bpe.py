"""picogpt.tokenizers.bpe against tiktoken, built from the same GPT-2 vocabulary files (those the
package ships, OpenAI's).

The reference is tiktoken's own algorithm and pre-tokenizing pattern (r50k_pat_str), with the
mergeable ranks decoded here independently of picogpt (tiktoken's construction of GPT-2's byte
alphabet), so agreement is evidence rather than an echo.
"""

import json
import random
from pathlib import Path

import pytest

from picogpt.tokenizers import GPT2_VOCABULARY
from picogpt.tokenizers import bpe as bpe_module
from picogpt.tokenizers.bpe import BPE, VocabularyError

tiktoken = pytest.importorskip("tiktoken")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB_DIR = GPT2_VOCABULARY  # OpenAI's files, shipped in the package
TINY_DIR = Path(__file__).parent / "fixtures" / "gpt2-tiny"


def reference_encoding(folder, name):
    """A tiktoken Encoding from encoder.json (ranks = ids) and tiktoken's GPT-2 pattern."""
    from tiktoken_ext.openai_public import r50k_pat_str

    # tiktoken's own construction of GPT-2's byte alphabet (tiktoken/load.py)
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(256 + n)] = b
            n += 1
    encoder = json.loads((Path(folder) / "encoder.json").read_text(encoding="utf-8"))
    special = {"<|endoftext|>": encoder.pop("<|endoftext|>")}
    ranks = {bytes(char_to_byte[c] for c in token): i for token, i in encoder.items()}
    return tiktoken.Encoding(
        name=name, pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=special
    )


@pytest.fixture(scope="module")
def gpt2():
    return BPE.load(VOCAB_DIR)


@pytest.fixture(scope="module")
def ref():
    return reference_encoding(VOCAB_DIR, "gpt2-local")


def generated_corpus(seed=0, n_docs=400, ascii_only=False):
    """Varied documents built from the places where tokenizers usually go wrong."""
    rng = random.Random(seed)
    contractions = [
        a + b
        for a in ["'", "’"]
        for c in ["s", "t", "re", "ve", "m", "ll", "d", "x"]
        for b in {c, c.upper(), c.capitalize(), c[:-1] + c[-1].upper()}
    ]
    fragments = contractions + [
        " ", "  ", "   ", "\t", "\t\t", " \t ", "\n", "\n\n", "\r\n", "\r\n\r\n", "  \n", "\n  ",
        " \n ", "\x0b", "\x0c", "\r",
        "don't", "DON'T", "I'M", "we'll", "They'Re", "it'S", "o'clock", "rock'n'roll", "'",
        "0", "7", "42", "123", "4567", "1234567890", "3.14159", "1,000,000", "-5", "+1e10",
        "0x1F", "2024-01-01", "10:30", "50%",
        "!", "!!!", "...", "?!", "--", "---", "—", "–", "«", "»", "(", ")", "[", "]", "{", "}",
        "<", ">", "@", "#", "$", "€", "£", "¥", "&&", "||", "==", "!=", "->", "=>", "::", "/*",
        "*/", "//", "\\", "\\n", '"', "“", "”", "‘", "’", "_", "__init__", "`", "~", "^", "|",
        "<|endoftext|>", "<|endoftext", "endoftext|>", "<|", "|>", "<|endoftext|><|endoftext|>",
        "hello", "Hello", "HELLO", "world", " world", "the", " the", "The", "a", "I",
        "supercalifragilisticexpialidocious", "antidisestablishmentarianism",
        "café", "naïve", "résumé", "Ångström", "Straße", "ñandú", "Ærøskøbing", "Łódź",
        "İstanbul", "ǅ", "ﬁ", "e\u0301", "a\u0308\u0304",
        "中文", "日本語のテキスト", "汉字漢字", "한국어", "ひらがな", "カタカナ", "，", "。",
        "العربية", "مرحبا بالعالم", "עברית", "שָׁלוֹם", "Привет", "мир", "Ελληνικά", "हिन्दी",
        "ไทย", "ქართული", "Ⅻ", "²", "½", "٣٤", "१२३", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟘𝟙",
        "👍", "👍🏽", "👋🏿", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "1️⃣", "❤️", "😀", "🤗", "🦜",
        "\x00", "\x01", "\x07", "\x1b[0m", "\x1c", "\x1f", "\x7f", "\x85", "\xa0", "\xad",
        "\u2028", "\u2029", "\u3000", "\u200b", "\u200d", "\ufeff", "\ufffd", "\U0010ffff",
        "\u1680", "\u2009", "\u202f",
    ]
    long_words = [
        "x" * 1000, "ab" * 700, "Ġ" * 300, "9" * 500, "!" * 400, " " * 300, "\n" * 200,
        "é" * 300, "中" * 400, "👍" * 100,
    ]
    letters = "abcdefghijklmnopqrstuvwxyz" + ("" if ascii_only else "é")
    if ascii_only:
        fragments = [f for f in fragments if f.isascii()]
        long_words = [w for w in long_words if w.isascii()]
    docs = []
    for _ in range(n_docs):
        parts = [rng.choice(fragments) for _ in range(rng.randint(1, 60))]
        if rng.random() < 0.1:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(long_words))
        if rng.random() < 0.1:  # a long random word of letters: the heap merge path
            parts.append(" " + "".join(rng.choice(letters) for _ in range(2000)))
        joiner = rng.choice(["", "", " ", "\n"])
        docs.append(joiner.join(parts))
    return docs


CORPUS = generated_corpus()
# Pure-ASCII documents take the fast `re` pre-tokenizer rather than `regex`: test them apart.
ASCII_CORPUS = generated_corpus(seed=1, n_docs=200, ascii_only=True)
PROSE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "It's 3:45pm — don't panic! We'll've seen 1,234 cafés in Zürich (and 東京).\r\n\t\tDone.   \n"
)


def test_load_reads_the_real_vocabulary(gpt2):
    assert gpt2.n_vocab == 50257
    assert gpt2.eot_id == 50256
    assert len(gpt2.merges) == 50000
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}


def test_the_shipped_vocabulary_is_tiktokens_token_for_token(gpt2, monkeypatch):
    """tiktoken's own reader of OpenAI's two files (which checks their sha256 against the pins
    and the encoder against the merges) gives every id the bytes picogpt gives it."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from picogpt.hub.sources import PINNED

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files themselves, not a cached copy
    ranks = data_gym_to_mergeable_bpe_ranks(str(VOCAB_DIR / "vocab.bpe"),
                                            str(VOCAB_DIR / "encoder.json"),
                                            PINNED["vocab.bpe"], PINNED["encoder.json"])
    assert len(ranks) == 50256 and gpt2.n_vocab == 50257 and gpt2.eot_id == 50256
    assert {gpt2.decode_bytes([i]): i for i in range(50256)} == ranks


def test_byte_alphabet_matches_tiktokens_construction():
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = bpe_module.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert all(table[b] == chr(b) for b in printable)
    others = [b for b in range(256) if b not in printable]
    assert [table[b] for b in others] == [chr(256 + i) for i in range(len(others))]


def test_corpus_matches_tiktoken(gpt2, ref):
    for doc in CORPUS:
        assert gpt2.encode(doc) == ref.encode_ordinary(doc), repr(doc[:200])


def test_ascii_corpus_matches_tiktoken(gpt2, ref):
    assert all(doc.isascii() for doc in ASCII_CORPUS)
    for doc in ASCII_CORPUS:
        assert gpt2.encode(doc) == ref.encode_ordinary(doc), repr(doc[:200])
    text = "".join(ASCII_CORPUS)
    assert BPE.load(VOCAB_DIR).encode(text) == ref.encode_ordinary(text)


def test_whole_corpus_as_one_text_matches_tiktoken(ref):
    # One long mixed text: exercises the split into blocks (ASCII blocks take the fast engine).
    text = "".join(CORPUS) + PROSE * 200
    assert len(text) > 20 * bpe_module._BLOCK_CHARS
    fresh = BPE.load(VOCAB_DIR)
    assert fresh.encode(text) == ref.encode_ordinary(text)


def test_prose_matches_tiktoken_cold_and_warm(ref):
    fresh = BPE.load(VOCAB_DIR)
    expected = ref.encode_ordinary(PROSE * 50)
    assert fresh.encode(PROSE * 50) == expected  # cold cache
    assert fresh.encode(PROSE * 50) == expected  # warm cache


def test_decode_inverts_encode_on_the_corpus(gpt2):
    for doc in CORPUS:
        assert gpt2.decode(gpt2.encode(doc)) == doc


def test_endoftext_is_ordinary_text_unless_allowed(gpt2, ref):
    text = "a<|endoftext|>b <|endoftext|>\n<|endoftext|><|endoftext|> <|endoftext"
    assert gpt2.encode(text) == ref.encode_ordinary(text)
    assert gpt2.eot_id not in gpt2.encode(text)
    allowed = gpt2.encode(text, allow_special=True)
    assert allowed == ref.encode(text, allowed_special="all")
    assert allowed.count(gpt2.eot_id) == 4
    assert gpt2.decode(allowed) == text
    assert gpt2.encode("<|endoftext|>", allow_special=True) == [50256]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_any_text_matches_tiktoken(gpt2, ref, text):
    ids = gpt2.encode(text)
    assert ids == ref.encode_ordinary(text)
    assert gpt2.decode(ids) == text


# Text drawn from the characters that matter most to the pattern: spaces of every kind,
# apostrophes and contraction letters, digits, letters, punctuation, multi-byte characters.
tricky_text = st.lists(
    st.sampled_from(
        list(" \t\n\r\x0b\x0c\x85\xa0\u3000\u2028'’sStTdDmMlLvVrReE0123456789.,!?-_<|>")
        + ["a", "é", "中", "👍", "\u200d", "🏽", "<|endoftext|>"]
    ),
    max_size=80,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(tricky_text)
def test_tricky_text_matches_tiktoken(gpt2, ref, text):
    assert gpt2.encode(text) == ref.encode_ordinary(text)
    assert gpt2.encode(text, allow_special=True) == ref.encode(text, allowed_special="all")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, min_codepoint=0xD7F0, max_codepoint=0xE010)))
def test_lone_surrogates_are_replaced_as_tiktoken_does(gpt2, ref, text):
    assert gpt2.encode(text) == ref.encode_ordinary(text)


ascii_text = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=127), max_size=300),
    st.lists(
        st.sampled_from(list("'sStTdDmMlLvVrReEa0. _!\t\n\r\x0b\x0c\x1c\x1f\x00\x7f") + ["  "]),
        max_size=100,
    ).map("".join),
)


@settings(max_examples=500, deadline=None)
@given(ascii_text)
def test_ascii_fast_pattern_splits_like_gpt2_pattern(gpt2, ref, text):
    assert bpe_module._ASCII_RE.findall(text) == bpe_module._GPT2_RE.findall(text)
    assert gpt2.encode(text) == ref.encode_ordinary(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdeéthinsr Ġ")), min_size=1, max_size=300))
def test_long_piece_merge_equals_short_piece_merge(gpt2, text):
    word = text.encode("utf-8").decode("latin-1").translate(bpe_module._LATIN1_TO_GPT2)
    ranks = gpt2._ranks
    assert bpe_module._merge_long(word, ranks) == bpe_module._merge_short(word, ranks)


# -- decoding ---------------------------------------------------------------------------------


def test_decode_replaces_invalid_utf8_like_tiktoken(gpt2, ref):
    rng = random.Random(1)
    for _ in range(300):
        # byte tokens, merged tokens and pieces of multi-byte characters
        ids = [rng.choice([rng.randrange(256), rng.randrange(50257)]) for _ in range(20)]
        assert gpt2.decode(ids) == ref.decode(ids)
        assert gpt2.decode_bytes(ids) == ref.decode_bytes(ids)


def test_unknown_id_is_a_value_error_naming_it(gpt2):
    for bad in (50257, -1, 10**9):
        with pytest.raises(ValueError, match=str(bad)):
            gpt2.decode([1, bad, 2])
        with pytest.raises(ValueError, match=str(bad)):
            gpt2.decoder().feed(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 255), st.integers(0, 50256)), max_size=40))
def test_streamed_decoding_concatenates_to_decode(gpt2, ids):
    decoder = gpt2.decoder()
    streamed = "".join(decoder.feed(i) for i in ids) + decoder.flush()
    assert streamed == gpt2.decode(ids)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_streaming_valid_text_never_shows_a_replacement_character(gpt2, text):
    text = text.replace("\ufffd", "")
    decoder = gpt2.decoder()
    pieces = [decoder.feed(i) for i in gpt2.encode(text)]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == text


def test_streaming_holds_back_a_character_split_across_tokens(gpt2):
    for char in ["👨‍👩‍👧‍👦", "🦜", "語"]:
        ids = gpt2.encode(char)
        assert len(ids) > 1, "needs a character whose bytes span tokens"
        decoder = gpt2.decoder()
        outputs = [decoder.feed(i) for i in ids]
        assert "".join(outputs) == char
        assert outputs[0] == ""  # the first token alone is an incomplete character
        assert decoder.flush() == ""


def test_streaming_flushes_an_unfinished_character_as_replacement(gpt2):
    first_byte_of_emoji = gpt2.encode("🦜")[0]
    decoder = gpt2.decoder()
    assert decoder.feed(first_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.feed(gpt2.encode("ok")[0]) == "ok"  # usable again after a flush


def test_streaming_emits_an_impossible_sequence_without_waiting(gpt2):
    # a lone continuation byte can never become valid: its U+FFFD comes out at once
    continuation = next(i for i in range(256) if 0x80 <= gpt2.decode_bytes([i])[0] < 0xC0)
    decoder = gpt2.decoder()
    assert decoder.feed(continuation) == "\ufffd"
    assert decoder.flush() == ""


# -- errors -----------------------------------------------------------------------------------


def copy_vocab(tmp_path, encoder_text=None, merges_text=None):
    encoder_json = (VOCAB_DIR / "encoder.json").read_text(encoding="utf-8")
    vocab_bpe = (VOCAB_DIR / "vocab.bpe").read_text(encoding="utf-8")
    (tmp_path / "encoder.json").write_text(encoder_text or encoder_json, encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text(merges_text or vocab_bpe, encoding="utf-8")
    return encoder_json, vocab_bpe


@pytest.mark.parametrize("missing", ["encoder.json", "vocab.bpe"])
def test_missing_file_is_named(tmp_path, missing):
    copy_vocab(tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing) as info:
        BPE.load(tmp_path)
    assert info.value.filename == str(tmp_path / missing)


def test_malformed_encoder_json_is_a_vocabulary_error(tmp_path):
    copy_vocab(tmp_path, encoder_text='{"a": 1,')
    with pytest.raises(VocabularyError, match="encoder.json"):
        BPE.load(tmp_path)
    copy_vocab(tmp_path, encoder_text='["a", "b"]')
    with pytest.raises(VocabularyError, match="encoder.json"):
        BPE.load(tmp_path)
    copy_vocab(tmp_path, encoder_text='{"a": "one"}')
    with pytest.raises(VocabularyError, match="ids"):
        BPE.load(tmp_path)


def test_malformed_merge_line_names_the_line(tmp_path):
    _, vocab_bpe = copy_vocab(tmp_path)
    lines = vocab_bpe.split("\n")
    lines[5] = "Ġ t h"
    copy_vocab(tmp_path, merges_text="\n".join(lines))
    with pytest.raises(VocabularyError, match="line 6"):
        BPE.load(tmp_path)


def test_merge_outside_the_encoder_is_named(tmp_path):
    _, vocab_bpe = copy_vocab(tmp_path)
    copy_vocab(tmp_path, merges_text=vocab_bpe.rstrip("\n") + "\nqqq zzz\n")
    with pytest.raises(VocabularyError, match="qqqzzz"):
        BPE.load(tmp_path)


def test_vocab_bpe_with_crlf_and_no_trailing_newline_loads(tmp_path, gpt2):
    _, vocab_bpe = copy_vocab(tmp_path)
    (tmp_path / "vocab.bpe").write_bytes(vocab_bpe.strip("\n").replace("\n", "\r\n").encode())
    assert BPE.load(tmp_path).encode(PROSE) == gpt2.encode(PROSE)


def test_encode_rejects_non_text(gpt2):
    with pytest.raises(TypeError):
        gpt2.encode(b"bytes")


# -- the tiny vocabulary of the shared fixture (a real subset of GPT-2's) ---------------------


@pytest.mark.skipif(not (TINY_DIR / "vocab.bpe").exists(), reason="gpt2-tiny fixture not present")
def test_tiny_vocabulary_matches_tiktoken():
    tiny = BPE.load(TINY_DIR)
    ref = reference_encoding(TINY_DIR, "gpt2-tiny")
    assert tiny.n_vocab == 513 and tiny.eot_id == 512
    for doc in CORPUS[:100] + [PROSE]:
        ids = tiny.encode(doc)
        assert ids == ref.encode_ordinary(doc)
        assert tiny.decode(ids) == doc


def test_a_vocab_bpe_cut_short_by_a_few_merges_is_refused(tmp_path):
    _, vocab_bpe = copy_vocab(tmp_path)
    lines = vocab_bpe.rstrip("\n").split("\n")
    (tmp_path / "vocab.bpe").write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"of the 49997 merges.*cut short"):
        BPE.load(tmp_path)


def test_special_tokens_are_tokens_no_text_could_make(tmp_path, gpt2):
    encoder_json, _ = copy_vocab(tmp_path)
    encoder = json.loads(encoder_json)
    extra = ["<|pad|>", "<|im_start|>", "[PAD]", "<s>", "<|a b|>"]
    encoder.update((token, 50257 + i) for i, token in enumerate(extra))
    copy_vocab(tmp_path, encoder_text=json.dumps(encoder))
    bpe = BPE.load(tmp_path)
    assert set(bpe.special_tokens) == {"<|endoftext|>", *extra}
    assert bpe.encode("x<|pad|>", allow_special=True) == [*gpt2.encode("x"), 50257]
    encoder["Ġzyzzyva"] = 50257 + len(extra)  # one pre-token piece that no merge makes
    copy_vocab(tmp_path, encoder_text=json.dumps(encoder))
    with pytest.raises(VocabularyError, match="Ġzyzzyva"):
        BPE.load(tmp_path)


def test_vocabulary_files_are_bounded_reads(tmp_path):
    copy_vocab(tmp_path)
    with open(tmp_path / "vocab.bpe", "r+b") as f:
        f.truncate(3 << 30)  # sparse: costs nothing on disk
    with pytest.raises(VocabularyError, match="vocab.bpe: GPT-2's merge list is 3,072.0 MB"):
        BPE.load(tmp_path)


def test_a_malformed_token_table_is_named_once(tmp_path):
    copy_vocab(tmp_path, encoder_text='{"a": 1')
    with pytest.raises(VocabularyError) as e:
        BPE.load(tmp_path)
    assert str(e.value).count("encoder.json") == 1, str(e.value)
    assert "not valid JSON" in str(e.value)
