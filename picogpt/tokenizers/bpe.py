"""GPT-2's byte-level BPE tokenizer, token-for-token identical to tiktoken's, in pure Python.

Encoding has three stages, each exactly as OpenAI defined it:
1. pre-tokenize: split the text into pieces ("words") with GPT-2's regular expression;
2. map every UTF-8 byte of a piece to a printable character (GPT-2's byte-to-unicode table), the
   alphabet in which `encoder.json` and `vocab.bpe` are written;
3. merge adjacent parts of the piece, lowest merge rank first, until no adjacent pair merges.

Merging follows tiktoken (the reference): a piece that is itself a token is that token, and a pair
merges when its concatenation is a token, taking the lowest rank first and the leftmost on ties.

Speed comes from doing the two expensive things as rarely and as cheaply as possible, never from
changing what is computed: pieces of plain ASCII are split with the standard library's `re` (a
faster engine than `regex`, given character classes that are exactly the ASCII parts of
GPT-2's Unicode classes), and each distinct piece is merged only once per tokenizer (a cache).
"""

import codecs
import functools
import heapq
import json
import re
from itertools import filterfalse, repeat
from pathlib import Path

import regex

from picogpt import files
from picogpt.errors import MissingFileError, VocabularyError

# GPT-2's pre-tokenizer (OpenAI's encoder.py; tiktoken's r50k/gpt2 pattern is the same language).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# The same pattern restricted to ASCII text. In ASCII, \p{L} is [A-Za-z], \p{N} is [0-9] and \s
# (Unicode White_Space) is [\t\n\v\f\r ]; \x1c-\x1f are not White_Space, although str.isspace()
# says they are, so they are spelled out rather than trusting \s in `re`. Both engines are
# leftmost-first backtracking engines, so on ASCII input the two patterns give the same pieces.
# (The contractions are grouped as tiktoken writes them: no contraction is a prefix of another,
# so at most one can match and the grouping changes nothing but speed.)
_ASCII_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"""
    r"""|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r ])|[\t\n\x0b\x0c\r ]+"""
)

# Texts that are not pure ASCII are cut into blocks of about this many characters, so the ASCII
# blocks still take the fast engine. A block ends just before whitespace that follows a
# non-whitespace character: no GPT-2 piece contains that pair (every piece is either all
# whitespace or starts with at most one space followed by no whitespace), and the pattern's only
# lookahead, (?!\S) after whitespace, never looks past a non-whitespace character; so splitting
# there and pre-tokenizing the blocks separately yields exactly the same pieces.
_BLOCK_CHARS = 4096
_BLOCK_END = regex.compile(r"\S(?=\s)")

# Pieces longer than this merge with a heap (O(n log n)); shorter ones with a plain list scan,
# which is faster for the few bytes of a typical word but quadratic in the piece length.
_LONG_PIECE = 64

# Distinct pieces cached per tokenizer before the cache starts over (bounds memory when a
# long-lived tokenizer sees endless new text: about 100 MB at worst, as long pieces, which
# rarely repeat, are not cached).
_CACHE_LIMIT = 500_000

ENDOFTEXT = "<|endoftext|>"
# GPT-2's encoder.json is 1.0 MB and vocab.bpe 0.5 MB; vocabularies four times as large fit.
ENCODER_LIMIT = 32 * files.MB
MERGES_LIMIT = 32 * files.MB
_NEVER = 1 << 62  # the "rank" of a pair that does not merge: above every real rank


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, soft hyphen, ...)
    map to U+0100 onwards in byte order, so that no token string contains whitespace.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {}
    n_shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n_shifted)
            n_shifted += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
# str.translate tables between the Latin-1 character of a byte (chr(b)) and its GPT-2 character.
_LATIN1_TO_GPT2 = {b: c for b, c in _BYTE_TO_CHAR.items()}
_GPT2_TO_LATIN1 = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}
_ALPHABET = frozenset(_BYTE_TO_CHAR.values())
# Joins token strings for one-call conversion: in neither GPT-2's alphabet nor Latin-1.
_SEPARATOR = "\uffff"


class BPE:
    """GPT-2 byte-level BPE: `encode(text) -> ids`, `decode(ids) -> text`, streaming decoder."""

    path = None  # the file of the vocabulary, when loaded from one (for messages)

    def __init__(self, encoder, merges):
        """`encoder` maps token strings (in GPT-2's byte alphabet, as in encoder.json) to ids;
        `merges` is the ranked list of pairs from vocab.bpe. Tokens that are neither a byte nor
        the result of a merge (such as `<|endoftext|>`) are special tokens: never produced from
        ordinary text."""
        # (Whole-table C calls rather than Python loops over 50,000 entries: loading is fast.)
        self.encoder = encoder
        self.merges = merges
        self.n_vocab = _count_ids(encoder)
        self.eot_id = encoder.get(ENDOFTEXT)

        if set(map(len, merges)) - {2}:
            rank = next(r for r, pair in enumerate(merges) if len(pair) != 2)
            raise VocabularyError(f"merge {rank} is not a pair of tokens: {merges[rank]!r}")
        merged = list(map("".join, merges))
        outside = set("".join(merged)).difference(_BYTE_TO_CHAR.values())
        if outside:
            rank = next(r for r, token in enumerate(merged) if not outside.isdisjoint(token))
            raise VocabularyError(
                f"merge {rank} {merges[rank]!r} has characters outside GPT-2's byte alphabet"
            )
        mergeable = set(_BYTE_TO_CHAR.values()).union(merged)
        missing = mergeable.difference(encoder)
        if missing:
            raise VocabularyError(self._missing_message(missing))
        # Rank of the token a pair merges into, keyed by the concatenation. Built backwards so
        # that if two merges made the same token, the first (lowest) rank is the one kept.
        self._ranks = dict(zip(reversed(merged), range(len(merged) - 1, -1, -1)))

        # Special tokens are matched whole in the text (allow_special=True), never merged into.
        specials = list(filterfalse(mergeable.__contains__, encoder))
        for token in filterfalse(_could_be_special, specials):
            raise VocabularyError(
                f"encoder token {token!r} (id {encoder[token]}) is neither a byte nor made by any "
                f"of the {len(merges)} merges, and it is not a special token: are merges missing "
                "(a vocab.bpe cut short)?"
            )
        self.special_tokens = {token: encoder[token] for token in specials}
        self._mergeable = dict(encoder)  # token -> id, without the special tokens
        for token in specials:
            del self._mergeable[token]
        self._special_pattern = None
        if specials:
            # Longest first, so a special token that is a prefix of another cannot shadow it.
            alternatives = sorted(specials, key=len, reverse=True)
            self._special_pattern = re.compile("|".join(map(re.escape, alternatives)))
        self._cache = _PieceCache(self._encode_piece)

    def _missing_message(self, missing):
        for token in sorted(missing.intersection(_BYTE_TO_CHAR.values())):
            return f"byte token {token!r} is missing from the encoder"
        for rank, (first, second) in enumerate(self.merges):
            if first + second in missing:
                token = first + second
                return f"merge {rank} ({first!r}, {second!r}): {token!r} is not in the encoder"
        raise AssertionError("unreachable")

    def file_bytes(self, names=("encoder.json", "vocab.bpe")):
        """The files that hold this tokenizer in a model folder: name -> bytes."""
        return table_files(self.encoder, self.merges, names)

    @classmethod
    def load(cls, folder, names=("encoder.json", "vocab.bpe")):
        """Read OpenAI's `encoder.json` and `vocab.bpe` from a model folder, or the same two files
        under other `names` (HuggingFace's vocab.json and merges.txt). Each is a regular file of
        bounded size; a missing one is a MissingFileError (a FileNotFoundError), anything else a
        VocabularyError naming the file."""
        folder = Path(folder)
        encoder_path, merges_path = (folder / name for name in names)
        for path in (encoder_path, merges_path):
            if not path.exists():  # said as files.check_regular says it
                raise MissingFileError(f"{path}: GPT-2's vocabulary file does not exist", path)
        encoder = files.load_json(encoder_path, ENCODER_LIMIT, "GPT-2's token table",
                                  error=VocabularyError)
        if not isinstance(encoder, dict):
            raise VocabularyError(f"{encoder_path}: expected a JSON object of token -> id")
        try:  # the ids are this file's alone: name it (the tables together name the folder)
            _count_ids(encoder)
        except VocabularyError as e:
            raise VocabularyError(f"{encoder_path}: {e}") from e
        text = files.read_text(merges_path, MERGES_LIMIT, "GPT-2's merge list",
                               error=VocabularyError)
        return cls.from_tables(encoder, _parse_merges(text, merges_path), encoder_path,
                               where=folder)

    @classmethod
    def from_tables(cls, encoder, merges, path, where=None):
        """A BPE from tables read from `path`; a malformed table is a VocabularyError naming
        `where` (default `path`)."""
        try:
            bpe = cls(encoder, merges)
        except VocabularyError as e:
            raise VocabularyError(f"{where or path}: {e}") from e
        bpe.path = path
        return bpe

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, text, allow_special=False):
        """Token ids of `text`. Special tokens such as `<|endoftext|>` are ordinary text unless
        `allow_special` is true, then each occurrence becomes its id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, not {type(text).__name__}")
        if not allow_special or self._special_pattern is None:
            return self._encode_ordinary(text)
        ids = []
        start = 0
        for match in self._special_pattern.finditer(text):
            ids += self._encode_ordinary(text[start : match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    def _encode_ordinary(self, text):
        try:
            return self._encode_valid(text)
        except UnicodeEncodeError:
            # Lone surrogates (from a bad decode, say) have no UTF-8. Like tiktoken, join
            # surrogate pairs into their character and replace the lone ones with U+FFFD.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._encode_valid(text)

    def _encode_valid(self, text):
        ids = []
        lookup = self._cache.__getitem__  # a dict lookup in C; misses call _encode_piece
        for pieces in _pretokenize(text):
            for piece_ids in map(lookup, pieces):
                ids += piece_ids
        return ids

    def _encode_piece(self, piece):
        """Ids of one pre-token piece (uncached)."""
        # one character per UTF-8 byte (ASCII is its own UTF-8), then GPT-2's alphabet
        if not piece.isascii():
            piece = piece.encode("utf-8").decode("latin-1")
        word = piece.translate(_LATIN1_TO_GPT2)
        token_id = self._mergeable.get(word)
        if token_id is not None:  # tiktoken's shortcut: a piece that is a token is that token
            return (token_id,)
        merge = _merge_long if len(word) > _LONG_PIECE else _merge_short
        return tuple(map(self._mergeable.__getitem__, merge(word, self._ranks)))

    # -- decoding ---------------------------------------------------------------------------------

    @functools.cached_property
    def _bytes_of(self):
        """id -> bytes, built on first use (encoding does not need it). Special tokens decode to
        their own UTF-8, as in tiktoken."""
        # one translate over the joined vocabulary instead of 50,000 small ones
        joined = _SEPARATOR.join(self._mergeable).translate(_GPT2_TO_LATIN1)
        token_bytes = map(str.encode, joined.split(_SEPARATOR), repeat("latin-1"))
        table = dict(zip(self._mergeable.values(), token_bytes))
        for token, i in self.special_tokens.items():
            table[i] = token.encode("utf-8")
        return table

    def decode_bytes(self, ids):
        """The bytes the ids stand for (they need not be valid UTF-8)."""
        try:
            return b"".join(map(self._bytes_of.__getitem__, ids))
        except KeyError as e:
            raise ValueError(self._bad_id_message(e.args[0])) from None

    def decode(self, ids):
        """Text of the ids; bytes that are not valid UTF-8 become U+FFFD, exactly as tiktoken's
        `decode` (Python's errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decoder(self):
        """A streaming decoder: `feed(id)` returns the characters completed by that token."""
        return IncrementalDecoder(self)

    def _bad_id_message(self, token_id):
        return f"token id {token_id!r} is not in the vocabulary (ids 0..{self.n_vocab - 1})"

    def __repr__(self):
        return f"BPE(n_vocab={self.n_vocab}, merges={len(self.merges)})"


class IncrementalDecoder:
    """Decodes one token at a time, for streaming.

    A character split across tokens (common for emoji and CJK) is held back until its last byte
    arrives, so streamed text never shows a replacement character for a character that is merely
    incomplete. Bytes that can no longer become a valid character come out as U+FFFD as soon as
    that is certain, the rest on `flush()`. The concatenation of every `feed` and the final
    `flush` equals `decode(ids)` (Python's incremental UTF-8 decoder replaces exactly the bytes
    the one-shot decoder replaces).
    """

    def __init__(self, bpe):
        self._bpe = bpe
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id):
        """The complete characters that this token finishes (maybe "")."""
        try:
            data = self._bpe._bytes_of[token_id]
        except (KeyError, TypeError):
            raise ValueError(self._bpe._bad_id_message(token_id)) from None
        return self._utf8.decode(data)

    def flush(self):
        """Whatever is held back, with U+FFFD for an unfinished character; the decoder is then
        ready for a new stream."""
        return self._utf8.decode(b"", final=True)


class _PieceCache(dict):
    """piece -> token ids, computing missing entries on lookup (dict's __missing__ hook keeps
    the common case, a hit, entirely in C)."""

    def __init__(self, encode_piece):
        super().__init__()
        self._encode_piece = encode_piece

    def __missing__(self, piece):
        ids = self._encode_piece(piece)
        if len(piece) <= _LONG_PIECE:
            if len(self) >= _CACHE_LIMIT:
                self.clear()
            self[piece] = ids
        return ids


def table_files(encoder, merges, names=("encoder.json", "vocab.bpe")):
    """A BPE's two tables as files, name -> bytes: the vocabulary as JSON (OpenAI's encoder.json,
    HF's vocab.json) and the merges one a line after a version line (vocab.bpe, merges.txt)."""
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return {names[0]: json.dumps(encoder, ensure_ascii=False).encode("utf-8"),
            names[1]: text.encode("utf-8")}


def _count_ids(encoder):
    """n_vocab: the number of tokens, once their ids are checked to be 0 to n_vocab - 1 without
    gaps (a model may produce any id below n_vocab). Everything is bounded by the table's own
    length, never by an id, so an id of 10^10 costs no more than an id of 10."""
    ids = list(encoder.values())
    if set(map(type, ids)) - {int} or min(ids, default=0) < 0:
        token = next(t for t, i in encoder.items() if type(i) is not int or i < 0)
        raise VocabularyError(f"token {token!r:.60} has id {encoder[token]!r:.60}: ids are "
                              "non-negative integers")
    if len(set(ids)) != len(ids):
        first = {}
        for token, i in encoder.items():
            if first.setdefault(i, token) != token:
                raise VocabularyError(f"tokens {first[i]!r:.60} and {token!r:.60} both have "
                                      f"id {i}: ids are distinct")
    if max(ids, default=-1) >= len(ids):
        token, top = max(encoder.items(), key=lambda item: item[1])
        gap = next(i for i, token_id in enumerate(sorted(ids)) if i != token_id)
        raise VocabularyError(f"token {token!r:.60} has id {top}, but ids must run from 0 to "
                              f"{len(ids) - 1} without gaps (one for each of the {len(ids)} "
                              f"tokens): the encoder has no token for id {gap}")
    return len(ids)


def _could_be_special(token):
    """Whether `token`, which no merge makes, can be a special token such as <|endoftext|>: text
    that ordinary encoding never turns into one token, because it has characters outside GPT-2's
    byte alphabet or because GPT-2's pre-tokenizer cuts it into pieces ('<|', 'endoftext', '|>').
    A token of one piece that no merge makes is what a vocab.bpe with missing merges leaves."""
    if not _ALPHABET.issuperset(token):
        return True
    try:
        text = token.translate(_GPT2_TO_LATIN1).encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:  # part of a character: an ordinary token's bytes
        return False
    return len(_GPT2_RE.findall(text)) > 1


def _parse_merges(text, path):
    """vocab.bpe: a `#version` line, then one merge per line, two tokens separated by a space."""
    body = text.replace("\r\n", "\n")
    first_line_no = 1
    if body.startswith("#version"):
        body, first_line_no = body.partition("\n")[2], 2
    # Token strings never contain whitespace (GPT-2's alphabet has none): split the whole file
    # at once, then check in one comparison that it is exactly one pair per line.
    tokens = body.split()
    merges = list(zip(tokens[0::2], tokens[1::2]))
    if "\n".join(map(" ".join, merges)) == body.strip("\n"):
        return merges
    # Something is off: go line by line to name it (blank lines alone are harmless).
    merges = []
    for line_no, line in enumerate(body.split("\n"), start=first_line_no):
        pair = tuple(line.split(" "))
        if len(pair) != 2 or not all(pair) or line != line.strip():
            if not line:
                continue
            raise VocabularyError(
                f"{path}, line {line_no}: expected two tokens separated by a space, "
                f"got {line[:80]!r}"
            )
        merges.append(pair)
    return merges


def _pretokenize(text):
    """GPT-2's pre-tokenizer: yields lists of pieces which, concatenated, are exactly
    GPT2_PATTERN's matches in `text`."""
    if text.isascii():
        yield _ASCII_RE.findall(text)
        return
    start = 0
    while start < len(text):
        end = start + _BLOCK_CHARS
        if end < len(text):
            match = _BLOCK_END.search(text, end - 1)
            end = match.end() if match else len(text)
        else:
            end = len(text)
        block = text[start:end]
        yield (_ASCII_RE if block.isascii() else _GPT2_RE).findall(block)
        start = end


_GPT2_RE = regex.compile(GPT2_PATTERN)
_ASCII_RE = re.compile(_ASCII_PATTERN)


def _merge_short(word, ranks):
    """BPE of `word` (a string in GPT-2's byte alphabet) into token strings: repeatedly merge the
    adjacent pair whose concatenation has the lowest rank, the leftmost on ties (tiktoken's rule).
    `pair_ranks[i]` is the rank of parts[i] + parts[i+1], so min() and index() scan it in C."""
    get = ranks.get
    never = _NEVER
    parts = list(word)
    pair_ranks = list(map(get, map(str.__add__, parts, parts[1:]), repeat(never)))
    while pair_ranks:
        best = min(pair_ranks)
        if best == never:
            break
        i = pair_ranks.index(best)
        parts[i] += parts.pop(i + 1)
        del pair_ranks[i]
        # only the pairs touching the merged part have changed
        if i:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], never)
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], never)
    return parts


def _merge_long(word, ranks):
    """The same merges as _merge_short, in O(n log n) for long pieces: the candidate pairs sit in
    a heap ordered by (rank, start), which pops the lowest rank and, among equal ranks, the
    leftmost pair. Entries made stale by an earlier merge are recognised and skipped: a pair's
    concatenation changes when either side grows, and a different string has a different rank."""
    n = len(word)
    next_start = list(range(1, n + 1))  # part starting at i ends where the next one starts
    prev_start = list(range(-1, n - 1))
    alive = [True] * n
    heap = [(ranks[word[i : i + 2]], i) for i in range(n - 1) if word[i : i + 2] in ranks]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        if not alive[i]:
            continue
        right = next_start[i]
        if right >= n or ranks.get(word[i : next_start[right]]) != rank:
            continue  # stale: one of the two parts has changed since this entry was pushed
        # merge the part at `right` into the part at `i`
        end = next_start[right]
        alive[right] = False
        next_start[i] = end
        if end < n:
            prev_start[end] = i
        left = prev_start[i]
        if left >= 0:
            r = ranks.get(word[left:end])
            if r is not None:
                heapq.heappush(heap, (r, left))
        if end < n:
            r = ranks.get(word[i : next_start[end]])
            if r is not None:
                heapq.heappush(heap, (r, i))
    parts = []
    i = 0
    while i < n:
        parts.append(word[i : next_start[i]])
        i = next_start[i]
    return parts
